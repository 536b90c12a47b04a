// `page-server --mem STORE/NAME`: one page server fronts a store for a rack. The bytes a client
// asks for are got chunk by chunk through the host chunk cache and its ChunkFetcher (one GET per
// chunk however many clients ask; every chunk verified after decompression before anything is
// located in it), then sent from the verified chunk. The manifest's working set is fetched
// first, from startup, so the rack's first VM finds it here.
import { createHash } from "node:crypto";
import type { EventLoop } from "../../core/event-loop.ts";
import type { Fields } from "../../core/log.ts";
import { IMAGE_PAGE, type ZeroMap } from "../image/snapshot-image.ts";
import { StoreError, type StoreErrorCode } from "./errors.ts";
import { chunkLength, type Manifest } from "./format.ts";
import { fetchManifest } from "./push.ts";
import { closeFetcher, hostFetcher, prefetchWorkingSet, type StoreSourceOptions } from "./store-source.ts";
import { parseStoreRef } from "./stores.ts";

export interface ServedStore {
  readonly size: number;
  readonly zero: ZeroMap;
  readonly base: number;
  readonly lazy: {
    want(start: number, end: number, urgent: boolean): void;
    locate(at: number, len: number): { addr: number; len: number } | undefined;
    whenReady(at: number, urgent: boolean, cb: (err: Error | undefined) => void): void;
  };
  readonly manifest: Manifest;
  /** Names the served bytes: the manifest's hash (a restarted page server on the same snapshot gives the same). */
  readonly imageId: Uint8Array;
  /** Joins the page server's loop and starts fetching the working set. */
  attach(loop: EventLoop): void;
  readonly summary: string;
  /** The summary's facts, as page_server.listening's fields. */
  readonly fields: Fields;
  close(): void;
}

export type ServedStoreOptions = Pick<StoreSourceOptions, "cacheDir" | "cacheSize" | "s3Endpoint" | "storeParallel" | "deadlineMs" | "logger">;

export async function openServedStore(ref: string, opts: ServedStoreOptions): Promise<ServedStore> {
  const { store, name } = parseStoreRef(ref, { s3Endpoint: opts.s3Endpoint });
  const manifest = await fetchManifest(store, name);
  const b = manifest.body;
  // Served as guest memory (no whole-file flag in INFO): a daemon would take the file's bytes for its VM's pages.
  if (b.image.source === "qemu-file") {
    throw new StoreError("BAD_CONFIG", `${ref} holds a whole QEMU snapshot file (push --whole-file, for qemu-restore), not guest memory; push it without --whole-file to serve it`, { ref });
  }
  const fetcher = hostFetcher(opts);
  const size = b.image.size;
  const chunkSize = b.chunkSize;
  const label = (c: number) => `chunk ${c} of "${name}"`;
  const chunkOf = (at: number) => Math.floor(at / chunkSize);
  const get = (c: number, urgent: boolean, cb: (err: StoreError | undefined) => void): void => {
    const hash = b.chunks[c];
    // decodeManifest checked that a null chunk has no data page, and only data pages are asked for.
    if (hash === null || hash === undefined) return cb(new StoreError("BAD_MANIFEST", `${label(c)} is all zero in the manifest, yet data pages were asked of it`));
    // The chunk's number joins the error's context (one fetch may serve equal chunks at several numbers).
    fetcher.acquire(store, hash, chunkLength(size, chunkSize, c), label(c), urgent, (err) => cb(err && new StoreError(err.code as StoreErrorCode, err.message, { ...err.context, ref, chunkIndex: c }, { cause: err })));
  };
  /** Chunks want() asked for that have not settled: asked again, they are only hurried (a client repeating requests while the store is slow adds no waiter each time). */
  const asked = new Set<number>();
  const lazy: ServedStore["lazy"] = {
    want(start, end, urgent) {
      for (let c = chunkOf(start); c * chunkSize < end; c++) {
        const first = (c * chunkSize) / IMAGE_PAGE;
        const from = Math.max(first, Math.floor(start / IMAGE_PAGE));
        const to = Math.min(first + chunkSize / IMAGE_PAGE, Math.ceil(end / IMAGE_PAGE), manifest.zero.pages);
        // Only chunks holding data pages of the request; waiting for them is whenReady's job.
        if (b.chunks[c] === null || manifest.zero.nextData(from, to) >= to) continue;
        if (!asked.has(c)) {
          asked.add(c);
          get(c, urgent, () => asked.delete(c));
        } else if (urgent) fetcher.hurry(b.chunks[c]!);
      }
    },
    locate(at, len) {
      const c = chunkOf(at);
      const hash = b.chunks[c];
      if (hash === null || hash === undefined) return undefined;
      // Looked up now: a chunk's bytes move from a fetch buffer to its cache mapping between turns.
      const chunk = fetcher.cache.peek(hash) ?? fetcher.cache.lookup(hash, chunkLength(size, chunkSize, c));
      if (chunk === undefined) return undefined;
      const into = at - c * chunkSize;
      return { addr: chunk.addr + into, len: Math.min(len, chunk.length - into) };
    },
    whenReady(at, urgent, cb) {
      get(chunkOf(at), urgent, cb);
    },
  };
  const id = createHash("sha256").update(`snapload-store\0${manifest.hash}`).digest().subarray(0, 16);
  return {
    size,
    zero: manifest.zero,
    base: 0,
    lazy,
    manifest,
    imageId: new Uint8Array(id),
    attach(loop) {
      fetcher.attach(loop);
      prefetchWorkingSet(store, manifest, fetcher, ref, opts.logger);
    },
    summary: `store ${ref} (manifest ${manifest.hash.slice(0, 16)}), ${b.chunks.filter((h) => h !== null).length} chunks of ${chunkSize / 1024} KiB, ${fetcher.cache.describe()}` +
      (manifest.workingSet ? `, working set of ${manifest.workingSet.length} pages fetched first` : ""),
    fields: { manifest: manifest.hash, chunkSize, chunks: b.chunks.filter((h) => h !== null).length, workingSetPages: manifest.workingSet?.length },
    close: () => closeFetcher(fetcher, ref, opts.logger),
  };
}
