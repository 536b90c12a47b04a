// A snapshot file pushed whole (`snapload push --whole-file`) read back by range: what
// `qemu-restore --mem STORE/NAME` reads. Chunks come through the same fetcher and host cache
// as `serve --mem STORE/NAME` (verified against their SHA-256 before anything sees them).
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { formatBytes } from "../../core/log.ts";
import type { RemoteFile } from "../remote-file.ts";
import type { SourceOptions } from "../port.ts";
import { ChunkCache } from "./chunk-cache.ts";
import { ChunkFetcher } from "./chunk-fetcher.ts";
import { StoreError } from "./errors.ts";
import { chunkLength } from "./format.ts";
import { fetchManifest } from "./push.ts";
import { DEFAULT_CACHE_SIZE, DEFAULT_STORE_PARALLEL, defaultCacheDir } from "./store-source.ts";
import { parseStoreRef } from "./stores.ts";

export async function openStoreFile(ref: string, opts: SourceOptions): Promise<RemoteFile> {
  const { store, name } = parseStoreRef(ref, { s3Endpoint: opts.s3Endpoint });
  const manifest = await fetchManifest(store, name);
  const b = manifest.body;
  if (b.image.source !== "qemu-file") {
    const what = b.image.source === "mapped-ram" ? `one RAM block ("${b.image.block}") of a mapped-ram file` : "a raw memory image";
    throw new StoreError("BAD_CONFIG", `${ref} holds ${what}, not a whole QEMU snapshot file: qemu-restore needs the device state too; push the snapshot file with --whole-file`, { ref });
  }
  const cache = new ChunkCache(opts.cacheDir ?? defaultCacheDir(), opts.cacheSize ?? DEFAULT_CACHE_SIZE, opts.logger);
  const fetcher = new ChunkFetcher(cache, { parallel: opts.storeParallel ?? DEFAULT_STORE_PARALLEL, deadlineMs: opts.deadlineMs, logger: opts.logger });
  const size = b.image.size;
  const chunkSize = b.chunkSize;
  /** Copies bytes [from, to) of the file, all inside chunk c, to out at from - off. */
  const copy = (c: number, from: number, to: number, out: Uint8Array, at: number, urgent: boolean): Promise<void> => {
    const hash = b.chunks[c];
    if (hash === null || hash === undefined) return Promise.resolve(); // all zero: never stored
    return new Promise((resolve, reject) => {
      fetcher.acquire(store, hash, chunkLength(size, chunkSize, c), `${name} chunk ${c}`, urgent, (err, local) => {
        if (err !== undefined) return reject(err);
        // Copied now: a chunk's address moves from its fetch buffer to its cache mapping later.
        out.set(new Uint8Array(toArrayBuffer(local!.addr as Pointer, from - c * chunkSize, to - from)), at);
        resolve();
      });
    });
  };
  return {
    size,
    description: ref,
    read: async (off, len, urgent) => {
      // As the page server's client refuses it: a read past the last page copied an empty or negative range (a bare RangeError).
      if (off % 4096 !== 0 || len % 4096 !== 0 || len <= 0 || off + len > Math.ceil(size / 4096) * 4096) {
        throw new StoreError("BAD_CONFIG", `${ref}: read of [${off}, +${len}) is not whole pages of the ${size}-byte file`, { ref, off, len, size });
      }
      const out = new Uint8Array(len);
      const end = Math.min(off + len, size);
      const parts: Promise<void>[] = [];
      for (let c = Math.floor(off / chunkSize); c * chunkSize < end; c++) {
        const from = Math.max(off, c * chunkSize);
        const to = Math.min(end, (c + 1) * chunkSize);
        parts.push(copy(c, from, to, out, from - off, urgent));
      }
      await Promise.all(parts);
      return out;
    },
    report: () => {
      const c = fetcher.counters;
      return {
        text: `store ${ref}: ${c.gets} GETs (${formatBytes(c.bytes)}), ${c.retries} retries, ${c.badFetches} corrupt, ${cache.counters.hits} cache hits`,
        fields: { gets: c.gets, bytes: c.bytes, retries: c.retries, badFetches: c.badFetches, cacheHits: cache.counters.hits },
      };
    },
    close: () => {
      // Chunks fetched but not written yet go to the cache now: the next restore finds them there.
      while (cache.persist());
    },
  };
}
