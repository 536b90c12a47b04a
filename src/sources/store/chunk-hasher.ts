// The CPU half of a push: each chunk's bytes read, data pages that hold only zeros found, the
// chunk named by its SHA-256, on every core (a share of the chunks per thread,
// chunk-hash-core.ts): for a second snapshot of a template this is nearly all a push costs. Hashes come back in batches as they are done, so the push checks and uploads the
// first ones while the rest are hashed. readChunk gets a chunk's bytes again, from the mapping, when
// it must be uploaded.
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { closeSync, openSync } from "node:fs";
import { availableParallelism } from "node:os";
import { IMAGE_PAGE, type SnapshotImage, type ZeroMap } from "../image/snapshot-image.ts";
import { type HashedRange, type HashJob, hashChunks, RangeHasher } from "./chunk-hash-core.ts";
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
/** Hashes per message from a thread: ~4 MiB of image, so uploads start while the rest is hashed. */
const BATCH_BYTES = 4 * 1024 * 1024;

/**
 * Hash threads to start for an image of `bytes`: one per core but this one, which hashes too
 * (a thread costs ~20-40 ms of CPU to boot, on a busy machine as much as it saves; none for a
 * small image).
 */
export function hashThreadsFor(bytes: number): number {
  return bytes < THREADS_FROM_BYTES ? 0 : Math.max(0, Math.min(availableParallelism(), 8) - 1);
}

/**
 * Worker threads started ahead of the work: one takes ~10-15 ms to boot, the image is opened and
 * the store asked meanwhile. A thread that cannot be had (a restricted runtime) is simply absent.
 */
export class HashThreads {
  readonly workers: Worker[] = [];
  /** This thread hashes too (false: it only takes what the others hand out; for tests). */
  hashHere = true;

  constructor(count: number) {
    for (let k = 0; k < count; k++) {
      try {
        this.workers.push(new Worker(WORKER));
      } catch {
        break;
      }
    }
  }

  close(): void {
    for (const w of this.workers) w.terminate();
    this.workers.length = 0;
  }
}

/**
 * Hashes every chunk, handing out batches of hashes (null: all zero) as they are done, in no
 * particular order between threads; before a batch is handed out, the image's zero map gains the
 * data pages of it that hold only zeros. This thread and the others (`threads`, closed when done)
 * claim batches as they go; what a failed thread claimed and did not hand out this one hashes.
 * `signal` aborted (the push failed): stops, rejecting with its reason.
 */
export async function hashImage(
  image: SnapshotImage,
  file: string,
  chunkSize: number,
  onBatch: (r: HashedRange) => void,
  threads?: HashThreads,
  signal?: AbortSignal,
): Promise<void> {
  const n = chunkCount(image.size, chunkSize);
  const zero = new Uint8Array(Math.ceil(image.zero.pages / 8));
  for (const run of image.zero.runs(0, image.zero.pages)) {
    if (run.zero) for (let p = run.first; p < run.first + run.count; p++) zero[p >>> 3]! |= 1 << (p & 7);
  }
  const fileOffset = image.blocks?.find((b) => b.name === image.blockName)?.pagesOffset ?? 0;
  const batch = Math.max(1, Math.floor(BATCH_BYTES / chunkSize));
  const batches = Math.ceil(n / batch);
  const got = new Uint8Array(batches); // batches handed out
  const emit = (r: HashedRange) => {
    got[r.from / batch] = 1;
    for (const p of r.zeroPages) image.zero.setZero(p);
    onBatch(r);
  };
  let fd = -1;
  try {
    // Shared by every thread, closed here once all are done or terminated (HashJob.fd).
    fd = openSync(file, "r");
    const job: HashJob = { file, fd, fileOffset, size: image.size, chunkSize, zero, batch, claim: new Int32Array(new SharedArrayBuffer(4)) };
    const workers = image.size < THREADS_FROM_BYTES ? [] : (threads?.workers ?? []);
    const running = Promise.all(workers.map((w) => inWorker(w, job, emit, signal)));
    running.catch(() => {}); // awaited below, unless this thread fails first
    // This thread hashes too, from the start (a thread takes a while to boot), a batch at a time
    // with the store's answers and the uploads let in between.
    const here = new RangeHasher(job);
    for (let r = threads?.hashHere === false && workers.length > 0 ? undefined : here.claimed(); r !== undefined; r = here.claimed()) {
      emit(r);
      await new Promise<void>((resolve) => setImmediate(resolve));
      signal?.throwIfAborted();
    }
    await running; // each thread is terminated once it is done
    // What no thread handed out (none could be had; one failed holding a batch): hashed here. A
    // real fault, such as a short read, fails here too and fails the push.
    const left: number[] = [];
    got.forEach((g, b) => g === 0 && left.push(b));
    hashChunks(job, emit, () => left.shift() ?? batches);
  } finally {
    // Threads first: none may read the fd once its number can be reused.
    threads?.close();
    if (fd >= 0) closeSync(fd);
  }
}

/**
 * The worker's module: next to this one, or, in the compiled binary (scripts/build-binary.ts
 * embeds it as an entry point), by its path under src/.
 */
const WORKER = import.meta.url.includes("/$bunfs/") ? "./sources/store/hash-worker.ts" : new URL("./hash-worker.ts", import.meta.url).href;

type WorkerMessage = HashedRange | { done: true } | { error: string };

/** Resolves once the thread has claimed all it will: done, failed, or gone. */
function inWorker(w: Worker, job: HashJob, emit: (r: HashedRange) => void, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (err?: unknown) => {
      if (settled) return;
      settled = true;
      w.terminate();
      if (err === undefined) resolve();
      else reject(err);
    };
    w.onmessage = (e: MessageEvent<WorkerMessage>) => {
      const m = e.data;
      if (settled) return;
      if ("done" in m || "error" in m) finish();
      else {
        try {
          emit(m);
        } catch (err) {
          finish(err);
        }
      }
    };
    w.onerror = () => finish();
    signal?.addEventListener("abort", () => finish(signal.reason), { once: true });
    w.postMessage(job);
  });
}
