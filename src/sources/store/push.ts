// `snapload push FILE STORE/NAME`, `pull STORE/NAME FILE` and `inspect STORE/NAME`.
// Push cuts the image into chunks, skips all-zero ones, names each by its SHA-256, uploads only
// what the store does not hold yet (several PUTs at once) and writes the manifest LAST: an
// interrupted push leaves orphan chunks (reused by the next push), never a visible snapshot.
import { toArrayBuffer, type Pointer } from "bun:ffi";
import { closeSync, ftruncateSync, openSync, renameSync, unlinkSync, writeSync } from "node:fs";
import { openImage } from "../image/open-image.ts";
import { IMAGE_PAGE, type ZeroMap } from "../image/snapshot-image.ts";
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
  isAllZero,
  type Manifest,
  type ManifestBody,
  manifestKey,
  sha256,
  STORE_FORMAT_VERSION,
  WHOLE_FILE_FORMAT_VERSION,
  zeroMapToBase64,
} from "./format.ts";
import { type ObjectStore, parseStoreRef, type StoreOptions } from "./stores.ts";

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
}

export const DEFAULT_PARALLEL = 8;

export async function push(file: string, ref: string, opts: PushOptions = {}): Promise<PushReport> {
  const t0 = performance.now();
  const { store, name } = parseStoreRef(ref, opts);
  if (!store.writable) throw new StoreError("BAD_CONFIG", `${store.url}: read-only store; push to file:// or s3://`);
  const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
  const level = opts.level ?? DEFAULT_ZSTD_LEVEL;
  const parallel = opts.parallel ?? DEFAULT_PARALLEL;
  const image = openImage(file, { ...(opts.ramblock === undefined ? {} : { ramblock: opts.ramblock }), wholeFile: opts.wholeFile === true });
  try {
    const size = image.size;
    const workingSet = opts.workingSet !== undefined ? await readWorkingSet(opts.workingSet, size) : undefined;
    const zero = image.zero; // refined below: data pages that hold only zeros become zero pages
    const n = chunkCount(size, chunkSize);
    const hashes: (string | null)[] = new Array(n).fill(null);
    const stored: number[] = new Array(n).fill(0);
    const seen = new Map<string, Promise<number>>(); // hash -> its object's size, once known
    const report = { zeroChunks: 0, duplicateChunks: 0, existingChunks: 0, uploadedChunks: 0, uploadedBytes: 0 };
    const buf = new Uint8Array(chunkSize);
    const again = new Uint8Array(chunkSize);
    const inFlight = new Set<Promise<unknown>>();
    let done = 0;
    let failure: unknown;
    for (let i = 0; i < n; i++) {
      if (failure !== undefined) break;
      const len = chunkLength(size, chunkSize, i);
      const bytes = readChunk(image.base, zero, i * chunkSize, len, buf);
      if (bytes === undefined) {
        report.zeroChunks++;
        done++;
        continue;
      }
      const hash = sha256(bytes);
      hashes[i] = hash;
      if (seen.has(hash)) {
        report.duplicateChunks++;
        done++;
        continue;
      }
      const key = chunkKey(hash);
      const at = i * chunkSize;
      // The store is asked first: a chunk it holds is neither compressed nor sent again.
      const task = (async () => {
        let objectSize = await store.size(key);
        if (objectSize !== undefined) report.existingChunks++;
        else {
          // Read again (the loop has moved on): from the image mapping, page cache warm.
          const { object } = encodeChunk(readChunk(image.base, zero, at, len, again)!, level);
          await store.put(key, object);
          objectSize = object.length;
          report.uploadedChunks++;
          report.uploadedBytes += object.length;
        }
        done++;
        opts.progress?.(done, n, report.uploadedBytes);
        return objectSize;
      })();
      seen.set(hash, task);
      const tracked = task.then(
        () => {},
        (e) => {
          failure ??= e;
        },
      );
      inFlight.add(tracked);
      tracked.finally(() => inFlight.delete(tracked));
      if (inFlight.size >= parallel) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    if (failure !== undefined) throw failure;
    for (let i = 0; i < n; i++) if (hashes[i] !== null) stored[i] = await seen.get(hashes[i]!)!;
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
    for (const size of seen.values()) storedBytes += await size;
    return {
      name,
      manifestHash: sha256(manifest.subarray(manifest.indexOf(0x0a) + 1)),
      size,
      chunks: n,
      ...report,
      storedBytes,
      seconds: (performance.now() - t0) / 1000,
    };
  } finally {
    image.close();
  }
}

/**
 * Chunk bytes [off, off+len) of the image into buf: data pages copied from the mapping, zero pages
 * (file holes, mapped-ram bitmap 0 — never read, they may lie past EOF) left zero. Pages that turn
 * out to hold only zeros are marked zero in `zero`. Undefined when every page is zero.
 */
function readChunk(base: number, zero: ZeroMap, off: number, len: number, buf: Uint8Array): Uint8Array | undefined {
  const out = buf.subarray(0, len);
  out.fill(0);
  const first = off / IMAGE_PAGE;
  const pages = Math.ceil(len / IMAGE_PAGE);
  let any = false;
  for (const run of zero.runs(first, pages)) {
    if (run.zero) continue;
    const a = run.first * IMAGE_PAGE;
    const b = Math.min(off + len, (run.first + run.count) * IMAGE_PAGE);
    out.set(new Uint8Array(toArrayBuffer((base + a) as Pointer, 0, b - a)), a - off);
    for (let p = run.first; p < run.first + run.count; p++) {
      const s = (p - first) * IMAGE_PAGE;
      if (isAllZero(out.subarray(s, Math.min(len, s + IMAGE_PAGE)))) zero.setZero(p);
      else any = true;
    }
  }
  return any ? out : undefined;
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
