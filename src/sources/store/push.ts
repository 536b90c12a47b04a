// `snapload push FILE STORE/NAME`, `pull STORE/NAME FILE` and `inspect STORE/NAME`.
// Push cuts the image into chunks, skips all-zero ones, names each by its SHA-256 (every core
// hashing), lists what the store holds, compresses and uploads only the rest (several PUTs at
// once, each as soon as its chunk is hashed and known absent) and writes the manifest LAST: an
// interrupted push leaves orphan chunks (reused by the next push), never a visible snapshot.
import { closeSync, ftruncateSync, openSync, renameSync, statSync, unlinkSync, writeSync } from "node:fs";
import { openImage } from "../image/open-image.ts";
import { IMAGE_PAGE, type SnapshotImage } from "../image/snapshot-image.ts";
import { formatBytes } from "../../core/log.ts";
import { readWorkingSet } from "../../scheduler/working-set.ts";
import { StoreError } from "./errors.ts";
import {
  chunkCount,
  chunkKey,
  chunkLength,
  DEFAULT_CHUNK_SIZE,
  DEFAULT_ZSTD_LEVEL,
  decodeChunk,
  decodeManifest,
  encodeChunk,
  encodeManifest,
  encodeWorkingSetField,
  type Manifest,
  type ManifestBody,
  manifestKey,
  sha256,
  STORE_FORMAT_VERSION,
  WHOLE_FILE_FORMAT_VERSION,
  zeroMapToBase64,
} from "./format.ts";
import { HashThreads, hashImage, hashThreadsFor, readChunk } from "./chunk-hasher.ts";
import type { HashedRange } from "./chunk-hash-core.ts";
import { LIST_PAGE, type ObjectStore, parseStoreRef, type StoreOptions } from "./stores.ts";

/** A push lists at least this many pages of the store's chunks before it asks for the rest one by one. */
const MIN_LIST_PAGES = 8;

export interface PushOptions extends StoreOptions {
  chunkSize?: number;
  level?: number;
  /** PUTs (and HEADs) in flight at once. */
  parallel?: number;
  ramblock?: string;
  /** Push the file's bytes whole (a mapped-ram file with its device state, for qemu-restore). */
  wholeFile?: boolean;
  /** A recorded working set (--record) stored in the manifest and prefetched first on restore. */
  workingSet?: string;
  /** Progress lines (a TTY gets a bar); undefined = quiet. */
  progress?: (done: number, total: number, uploadedBytes: number) => void;
}

export interface PushReport {
  name: string;
  manifestHash: string;
  size: number;
  chunks: number;
  zeroChunks: number;
  /** Data chunks equal to an earlier chunk of the same image. */
  duplicateChunks: number;
  /** Distinct chunks the store already held (earlier snapshots, an interrupted push). */
  existingChunks: number;
  uploadedChunks: number;
  uploadedBytes: number;
  /** Stored bytes of every distinct chunk this snapshot references. */
  storedBytes: number;
  seconds: number;
  /**
   * Where the time went, ms: hashing every chunk, listing the store (at the same time), and the
   * uploads still running once hashing was over (the others ran while it hashed).
   */
  phases: { hashMs: number; listMs: number; uploadMs: number };
}

export const DEFAULT_PARALLEL = 8;

export async function push(file: string, ref: string, opts: PushOptions = {}): Promise<PushReport> {
  const t0 = performance.now();
  const { store, name } = parseStoreRef(ref, opts);
  if (!store.writable) throw new StoreError("BAD_CONFIG", `${store.url}: read-only store; push to file:// or s3://`);
  const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
  const level = opts.level ?? DEFAULT_ZSTD_LEVEL;
  const parallel = opts.parallel ?? DEFAULT_PARALLEL;
  // The hash threads boot while the image is opened (the file's size stands for the image's).
  const threads = new HashThreads(hashThreadsFor(fileBytes(file)));
  try {
    // Not prefaulted: hashing reads the file; the mapping only gives the chunks to upload.
    const image = openImage(file, { ...(opts.ramblock === undefined ? {} : { ramblock: opts.ramblock }), wholeFile: opts.wholeFile === true, prefault: false });
    try {
      return await pushImage(image, file, store, name, threads, { ...opts, chunkSize, level, parallel }, t0);
    } finally {
      image.close();
    }
  } finally {
    threads.close();
  }
}

function fileBytes(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0; // openImage says what is wrong
  }
}

/**
 * Hashing, existence checks, compression and uploads as one pipeline: each batch of hashes the
 * threads hand back is checked against the store's listing (asked at the start, answered while
 * the first chunks are hashed) and what the store lacks is compressed and uploaded at once, by
 * `parallel` uploaders, while the rest is still hashed. The manifest goes last, once every chunk
 * it names is in the store.
 */
async function pushImage(
  image: SnapshotImage,
  file: string,
  store: ObjectStore,
  name: string,
  threads: HashThreads,
  opts: PushOptions & { chunkSize: number; level: number; parallel: number },
  t0: number,
): Promise<PushReport> {
  const { chunkSize, level } = opts;
  const size = image.size;
  const workingSet = opts.workingSet !== undefined ? await readWorkingSet(opts.workingSet, size) : undefined;
  const zero = image.zero; // refined by hashImage: data pages that hold only zeros become zero pages
  const n = chunkCount(size, chunkSize);
  const hashes: (string | null)[] = new Array(n).fill(null);
  const report = { zeroChunks: 0, duplicateChunks: 0, existingChunks: 0, uploadedChunks: 0, uploadedBytes: 0 };
  const tHash = performance.now();
  const phases = { hashMs: 0, listMs: 0, uploadMs: 0 };
  // What the store holds is neither compressed nor sent again, and costs no request of its own.
  const listing = listChunks(store, Math.max(MIN_LIST_PAGES, Math.ceil(n / LIST_PAGE) * 4)).then((l) => {
    phases.listMs = performance.now() - tHash;
    return l;
  });
  const first = new Map<string, number>(); // distinct hash -> first chunk holding it
  const sizes = new Map<string, number>(); // hash -> its object's size
  const todo: [string, number][] = []; // distinct hashes in the order they were hashed
  let hashed = false; // every chunk hashed (or hashing failed: `stop`)
  let stop = false;
  let done = 0;
  let waiting: (() => void)[] = [];
  const wake = () => {
    const w = waiting;
    waiting = [];
    for (const f of w) f();
  };
  const onBatch = (r: HashedRange) => {
    r.hashes.forEach((h, k) => {
      const i = r.from + k;
      hashes[i] = h;
      if (h === null) report.zeroChunks++;
      else if (first.has(h)) report.duplicateChunks++;
      else {
        first.set(h, i);
        todo.push([h, i]);
        return;
      }
      done++;
    });
    opts.progress?.(done, n, report.uploadedBytes);
    wake();
  };
  const abort = new AbortController(); // a failed upload stops the hashing
  const hashing = hashImage(image, file, chunkSize, onBatch, threads, abort.signal).then(
    () => {
      phases.hashMs = performance.now() - tHash;
      hashed = true;
      wake();
    },
    (e) => {
      stop = hashed = true;
      wake();
      throw e;
    },
  );
  const buf = new Uint8Array(chunkSize);
  let next = 0;
  const uploader = async () => {
    const listed = await listing;
    for (;;) {
      if (stop) return;
      if (next >= todo.length) {
        if (hashed) return;
        await new Promise<void>((r) => waiting.push(r));
        continue;
      }
      const [hash, i] = todo[next++]!;
      const key = chunkKey(hash);
      // Not in a complete listing: not in the store. Past a listing cut short: asked (HEAD).
      let objectSize = listed?.objects.get(key);
      if (objectSize === undefined && listed?.complete !== true) {
        objectSize = await store.size(key);
        if (stop) return; // the push failed meanwhile (its image may be closed already)
      }
      if (objectSize !== undefined) report.existingChunks++;
      else {
        // Compressed one at a time in this thread; the PUT goes while the next is compressed.
        const { object } = encodeChunk(readChunk(image, i * chunkSize, chunkLength(size, chunkSize, i), buf), level);
        objectSize = object.length;
        await store.put(key, object);
        if (stop) return; // the push failed meanwhile: nothing more to count or report
        report.uploadedChunks++;
        report.uploadedBytes += object.length;
      }
      sizes.set(hash, objectSize);
      done++;
      opts.progress?.(done, n, report.uploadedBytes);
    }
  };
  try {
    await Promise.all([hashing, ...Array.from({ length: opts.parallel }, uploader)]);
  } catch (e) {
    stop = true; // the other uploaders stop after what they are doing
    wake();
    abort.abort(e);
    throw e;
  }
  // What the uploads added once hashing was over (the rest of them ran meanwhile).
  phases.uploadMs = performance.now() - tHash - phases.hashMs;
  const stored: number[] = hashes.map((h) => (h === null ? 0 : sizes.get(h)!));
  const blocks = image.blocks?.map((b) => ({ name: b.name, usedLength: b.usedLength, pageSize: b.pageSize }));
  const blockPageSize = image.blocks?.find((b) => b.name === image.blockName)?.pageSize;
  const body: ManifestBody = {
    format: opts.wholeFile ? WHOLE_FILE_FORMAT_VERSION : STORE_FORMAT_VERSION,
    name,
    created: new Date().toISOString(),
    image: {
      size,
      pageSize: IMAGE_PAGE,
      source: opts.wholeFile ? "qemu-file" : image.format,
      ...(image.blockName !== undefined ? { block: image.blockName, blockPageSize, blocks } : {}),
    },
    chunkSize,
    compression: { codec: "zstd", level },
    zero: zeroMapToBase64(zero),
    chunks: hashes,
    stored,
    ...(workingSet !== undefined ? { workingSet: encodeWorkingSetField(workingSet) } : {}),
  };
  const manifest = encodeManifest(body);
  // Last: only now does NAME point at a complete snapshot.
  await store.put(manifestKey(name), manifest);
  let storedBytes = 0;
  for (const size of sizes.values()) storedBytes += size;
  return {
    name,
    manifestHash: sha256(manifest.subarray(manifest.indexOf(0x0a) + 1)),
    size,
    chunks: n,
    ...report,
    storedBytes,
    seconds: (performance.now() - t0) / 1000,
    phases,
  };
}

/**
 * The chunks a store holds, with their sizes, within `pages` pages of listing in all (a page is
 * a round trip of up to 1000 keys). One page first: a store of a few snapshots fits in it, and
 * each listing costs the store's CPU as much as a small PUT, CPU the push's hashing shares on a
 * small machine. Past one page, one listing per first hex digit of the hash, all at once.
 * Undefined when the store cannot list; `complete` false when the budget ran out (the rest are
 * asked one by one).
 */
async function listChunks(store: ObjectStore, pages: number): Promise<{ objects: Map<string, number>; complete: boolean } | undefined> {
  if (store.list === undefined) return undefined;
  const head = await store.list("chunks/", 1);
  if (head.complete) return head;
  const digits = "0123456789abcdef";
  const per = Math.max(1, Math.floor((pages - 1) / digits.length));
  const parts = await Promise.all([...digits].map((d) => store.list!(`chunks/${d}`, per)));
  const objects = new Map<string, number>();
  for (const p of parts) for (const [k, v] of p.objects) objects.set(k, v);
  return { objects, complete: parts.every((p) => p.complete) };
}

// ---- reading a snapshot ------------------------------------------------------------------------

export async function fetchManifest(store: ObjectStore, name: string): Promise<Manifest> {
  const key = manifestKey(name);
  const bytes = await store.get(key);
  if (bytes === undefined) throw new StoreError("NOT_FOUND", `${store.url}: no snapshot named "${name}" (no object ${key})`, { key });
  return decodeManifest(bytes, `${store.url}/${key}`);
}

/** Fetches and verifies chunk i of a snapshot (a missing or corrupt chunk throws). */
export async function fetchChunk(store: ObjectStore, m: Manifest, i: number): Promise<Uint8Array> {
  const hash = m.body.chunks[i]!;
  const key = chunkKey(hash);
  const object = await store.get(key);
  if (object === undefined) throw new StoreError("NOT_FOUND", `${store.url}: chunk ${i} of "${m.body.name}" is missing (no object ${key})`, { key });
  return decodeChunk(object, hash, chunkLength(m.body.image.size, m.body.chunkSize, i), `${store.url}/${key}`);
}

export interface PullReport {
  name: string;
  size: number;
  fetchedChunks: number;
  fetchedBytes: number;
  seconds: number;
}

/** Rebuilds the raw image: data pages written, zero pages left as holes (sparse). */
export async function pull(ref: string, file: string, opts: StoreOptions & { parallel?: number } = {}): Promise<PullReport> {
  const t0 = performance.now();
  const { store, name } = parseStoreRef(ref, opts);
  const m = await fetchManifest(store, name);
  const { size, chunkSize } = { size: m.body.image.size, chunkSize: m.body.chunkSize };
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = openSync(tmp, "w");
  let fetchedChunks = 0;
  let fetchedBytes = 0;
  try {
    ftruncateSync(fd, size);
    const todo = m.body.chunks.map((h, i) => (h === null ? -1 : i)).filter((i) => i >= 0);
    const parallel = opts.parallel ?? DEFAULT_PARALLEL;
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        const i = todo[next++]!;
        const bytes = await fetchChunk(store, m, i);
        fetchedChunks++;
        fetchedBytes += m.body.stored[i]!;
        const first = (i * chunkSize) / IMAGE_PAGE;
        for (const run of m.zero.runs(first, Math.ceil(bytes.length / IMAGE_PAGE))) {
          if (run.zero) continue;
          const a = (run.first - first) * IMAGE_PAGE;
          const b = Math.min(bytes.length, a + run.count * IMAGE_PAGE);
          writeSync(fd, bytes, a, b - a, i * chunkSize + a);
        }
      }
    };
    await Promise.all(Array.from({ length: parallel }, worker));
  } catch (e) {
    closeSync(fd);
    try {
      unlinkSync(tmp);
    } catch {}
    throw e;
  }
  closeSync(fd);
  renameSync(tmp, file);
  return { name, size, fetchedChunks, fetchedBytes, seconds: (performance.now() - t0) / 1000 };
}

export interface StoreInspectReport {
  store: string;
  name: string;
  manifestHash: string;
  format: number;
  created: string;
  source: string;
  block?: string;
  blockPageSize?: number;
  blocks?: { name: string; usedLength: number; pageSize: number }[];
  size: number;
  dataPages: number;
  zeroPages: number;
  chunkSize: number;
  compression: string;
  chunks: number;
  zeroChunks: number;
  dataChunks: number;
  distinctChunks: number;
  /** Uncompressed bytes of the distinct chunks. */
  distinctBytes: number;
  storedBytes: number;
  workingSetPages: number;
}

export async function inspectStore(ref: string, opts: StoreOptions = {}): Promise<StoreInspectReport> {
  const { store, name } = parseStoreRef(ref, opts);
  const m = await fetchManifest(store, name);
  const b = m.body;
  const distinct = new Map<string, number>();
  b.chunks.forEach((h, i) => {
    if (h !== null && !distinct.has(h)) distinct.set(h, i);
  });
  let distinctBytes = 0;
  let storedBytes = 0;
  for (const i of distinct.values()) {
    distinctBytes += chunkLength(b.image.size, b.chunkSize, i);
    storedBytes += b.stored[i]!;
  }
  const zeroPages = m.zero.countZero();
  const dataChunks = b.chunks.filter((h) => h !== null).length;
  return {
    store: store.url,
    name,
    manifestHash: m.hash,
    format: b.format,
    created: b.created,
    source: b.image.source,
    ...(b.image.block !== undefined ? { block: b.image.block, blockPageSize: b.image.blockPageSize, blocks: b.image.blocks } : {}),
    size: b.image.size,
    dataPages: m.zero.pages - zeroPages,
    zeroPages,
    chunkSize: b.chunkSize,
    compression: `${b.compression.codec} level ${b.compression.level}`,
    chunks: b.chunks.length,
    zeroChunks: b.chunks.length - dataChunks,
    dataChunks,
    distinctChunks: distinct.size,
    distinctBytes,
    storedBytes,
    workingSetPages: m.workingSet?.length ?? 0,
  };
}

export function formatInspect(r: StoreInspectReport): string {
  const ratio = (a: number, b: number) => (b > 0 ? `${(a / b).toFixed(2)}x` : "-");
  const lines = [
    `${r.store}/${r.name}: snapload store format ${r.format}, manifest sha256 ${r.manifestHash}`,
    `created ${r.created}, from a ${r.source} image${r.block !== undefined ? `, block "${r.block}" (${formatBytes(r.blockPageSize ?? IMAGE_PAGE)} pages)` : ""}`,
    `size ${formatBytes(r.size)} (${r.size} bytes): ${r.dataPages} data pages, ${r.zeroPages} zero pages (4 KiB)`,
    `chunks: ${r.chunks} of ${formatBytes(r.chunkSize)}: ${r.zeroChunks} all-zero (not stored), ${r.dataChunks} data, ${r.distinctChunks} distinct (dedup ${ratio(r.dataChunks, r.distinctChunks)})`,
    `stored: ${formatBytes(r.storedBytes)} for ${formatBytes(r.distinctBytes)} of distinct chunks (${r.compression}, compression ${ratio(r.distinctBytes, r.storedBytes)}); logical ${formatBytes(r.size)} (${ratio(r.size, r.storedBytes)} overall)`,
    `working set: ${r.workingSetPages ? `${r.workingSetPages} pages, prefetched first on restore` : "none"}`,
  ];
  for (const blk of r.blocks ?? []) lines.push(`  block "${blk.name}": ${formatBytes(blk.usedLength)}, ${formatBytes(blk.pageSize)} pages${blk.name === r.block ? " (pushed)" : ""}`);
  return lines.join("\n");
}

export function formatPush(r: PushReport, ref: string): string {
  const data = r.chunks - r.zeroChunks;
  return (
    `pushed ${ref}: ${formatBytes(r.size)} in ${r.chunks} chunks (${r.zeroChunks} all-zero, ${r.duplicateChunks} duplicate, ${r.existingChunks} already in the store); ` +
    `uploaded ${r.uploadedChunks} of ${data} data chunks, ${formatBytes(r.uploadedBytes)} (stored total ${formatBytes(r.storedBytes)}) in ${r.seconds.toFixed(2)} s; manifest sha256 ${r.manifestHash.slice(0, 16)}`
  );
}
