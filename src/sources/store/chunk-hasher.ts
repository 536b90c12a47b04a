// The CPU half of a push: each chunk's bytes read, data pages that hold only zeros found, the
// chunk named by its SHA-256 — before the store is asked anything, on every core (a share of the
// chunks per thread, chunk-hash-core.ts): for a second snapshot of a template this is nearly all
// a push costs. readChunk gets a chunk's bytes again, from the mapping, when it must be uploaded.
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { availableParallelism } from "node:os";
import { IMAGE_PAGE, type SnapshotImage, type ZeroMap } from "../image/snapshot-image.ts";
import { type HashedRange, type HashJob, hashChunks } from "./chunk-hash-core.ts";
import { chunkCount } from "./format.ts";

/**
 * Chunk bytes [off, off+len) of the image, as hashed: a view of the mapping when every page is
 * data, else a copy into buf with zero pages (file holes, mapped-ram bitmap 0, pages found to
 * hold only zeros: never read, they may hold stale bytes or lie past EOF) left zero.
 */
export function readChunk(image: { base: number; zero: ZeroMap }, off: number, len: number, buf: Uint8Array): Uint8Array {
  const first = off / IMAGE_PAGE;
  const pages = Math.ceil(len / IMAGE_PAGE);
  if (image.zero.nextZero(first, first + pages) === first + pages) return new Uint8Array(toArrayBuffer((image.base + off) as Pointer, 0, len));
  const out = buf.subarray(0, len);
  out.fill(0);
  for (const run of image.zero.runs(first, pages)) {
    if (run.zero) continue;
    const a = run.first * IMAGE_PAGE;
    const b = Math.min(off + len, (run.first + run.count) * IMAGE_PAGE);
    out.set(new Uint8Array(toArrayBuffer((image.base + a) as Pointer, 0, b - a)), a - off);
  }
  return out;
}

/** Below this much image, a thread costs more than it saves. */
const THREADS_FROM_BYTES = 32 * 1024 * 1024;

/**
 * Every chunk's hash (null: all zero); the image's zero map gains the data pages that hold only
 * zeros. One worker thread per core, each over its share of the chunks; a worker that cannot be
 * had (a restricted runtime) leaves its share to this thread.
 */
export async function hashImage(image: SnapshotImage, file: string, chunkSize: number): Promise<(string | null)[]> {
  const n = chunkCount(image.size, chunkSize);
  const threads = image.size < THREADS_FROM_BYTES ? 1 : Math.max(1, Math.min(availableParallelism(), 8));
  const zero = new Uint8Array(Math.ceil(image.zero.pages / 8));
  for (const run of image.zero.runs(0, image.zero.pages)) {
    if (run.zero) for (let p = run.first; p < run.first + run.count; p++) zero[p >>> 3]! |= 1 << (p & 7);
  }
  const fileOffset = image.blocks?.find((b) => b.name === image.blockName)?.pagesOffset ?? 0;
  const per = Math.ceil(n / threads);
  const jobs: HashJob[] = [];
  for (let from = 0; from < n; from += per) jobs.push({ file, fileOffset, size: image.size, chunkSize, from, to: Math.min(n, from + per), zero });
  // Threads hash; this one stays free for the store's requests (the listing runs meanwhile).
  const ranges = threads <= 1 ? [hashChunks(jobs[0]!)] : await Promise.all(jobs.map((job) => inWorker(job).catch(() => hashChunks(job))));
  const hashes: (string | null)[] = new Array(n).fill(null);
  for (const r of ranges) {
    r.hashes.forEach((h, k) => {
      hashes[r.from + k] = h;
    });
    for (const p of r.zeroPages) image.zero.setZero(p);
  }
  return hashes;
}

/**
 * The worker's module: next to this one, or, in the compiled binary (scripts/build-binary.ts
 * embeds it as an entry point), by its path under src/.
 */
const WORKER = import.meta.url.includes("/$bunfs/") ? "./sources/store/hash-worker.ts" : new URL("./hash-worker.ts", import.meta.url).href;

function inWorker(job: HashJob): Promise<HashedRange> {
  return new Promise((resolve, reject) => {
    const w = new Worker(WORKER);
    w.onmessage = (e: MessageEvent<HashedRange | { error: string }>) => {
      w.terminate();
      if ("error" in e.data) reject(new Error(e.data.error));
      else resolve(e.data);
    };
    w.onerror = (e) => {
      w.terminate();
      reject(new Error(e.message));
    };
    w.postMessage(job);
  });
}
