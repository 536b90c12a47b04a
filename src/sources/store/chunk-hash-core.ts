// Hashing an image's chunks from its file, a batch at a time: what both a push's worker threads
// and its own thread run. Threads claim batches from one shared counter, so a thread slowed down
// (a busy core) takes fewer and all finish together. Only node:fs, Bun built-ins and core/errors.ts
// (no imports of its own): a worker starts in milliseconds only when its module graph is small
// (the CLI's graph costs ~200 ms per thread).
import { readSync } from "node:fs";
import { ImageError } from "../../core/errors.ts";

const PAGE = 4096;
const ZERO_PAGE = new Uint8Array(PAGE);

export interface HashJob {
  /** For messages: the file is read through `fd`. */
  file: string;
  /**
   * The file, opened by the push's own thread and closed by it once every thread is done or
   * terminated: threads share the process's fds, and one terminated mid-batch (a failed push)
   * never runs its cleanup, so an fd it opened itself would leak.
   */
  fd: number;
  /** Where image byte 0 lies in the file (raw: 0; mapped-ram: the block's pages). */
  fileOffset: number;
  size: number;
  chunkSize: number;
  /** The source's zero map, one bit per page, least significant first: 1 = zero (never read). */
  zero: Uint8Array;
  /** Chunks per batch. */
  batch: number;
  /** Batches claimed so far (shared between threads: Atomics.add claims the next one). */
  claim: Int32Array;
}

/** Chunks hashed since the last batch: `hashes[k]` is chunk `from + k`. */
export interface HashedRange {
  from: number;
  /** Per chunk of the range: its SHA-256, or null when every page of it is zero. */
  hashes: (string | null)[];
  /** Data pages (by the source's zero map) that hold only zeros: zero pages from now on. */
  zeroPages: number[];
}

const isZeroBit = (zero: Uint8Array, p: number) => ((zero[p >>> 3]! >>> (p & 7)) & 1) === 1;

/** Reads and hashes ranges of chunks of a job's file, one buffer reused. */
export class RangeHasher {
  private readonly buf: Uint8Array;
  readonly chunks: number;

  constructor(private readonly job: HashJob) {
    this.chunks = Math.ceil(job.size / job.chunkSize);
    this.buf = new Uint8Array(job.chunkSize);
  }

  /** The batch claimed from the shared counter, hashed; undefined once every batch is claimed. */
  claimed(next = () => Atomics.add(this.job.claim, 0, 1)): HashedRange | undefined {
    const from = next() * this.job.batch;
    if (!(from < this.chunks)) return undefined;
    return hashRange(this.job, this.job.fd, this.buf, from, Math.min(this.chunks, from + this.job.batch));
  }
}

/**
 * Hashes the batches it claims (`next`, by default the job's shared counter) until there are none
 * left, handing out each one as soon as it is done.
 */
export function hashChunks(job: HashJob, emit: (r: HashedRange) => void, next = () => Atomics.add(job.claim, 0, 1)): void {
  const h = new RangeHasher(job);
  for (let r = h.claimed(next); r !== undefined; r = h.claimed(next)) emit(r);
}

function hashRange(job: HashJob, fd: number, buf: Uint8Array, from: number, to: number): HashedRange {
  const { chunkSize, size, zero } = job;
  const hashes: (string | null)[] = [];
  const zeroPages: number[] = [];
  for (let i = from; i < to; i++) {
    const off = i * chunkSize;
    const len = Math.min(chunkSize, size - off);
    const out = buf.subarray(0, len);
    const first = off / PAGE;
    const pages = Math.ceil(len / PAGE);
    let any = false;
    let p = 0;
    while (p < pages) {
      // A run of data pages, read at once; zero pages stay zero bytes.
      if (isZeroBit(zero, first + p)) {
        out.fill(0, p * PAGE, Math.min(len, (p + 1) * PAGE));
        p++;
        continue;
      }
      let e = p + 1;
      while (e < pages && !isZeroBit(zero, first + e)) e++;
      const a = p * PAGE;
      const b = Math.min(len, e * PAGE);
      let got = 0;
      while (got < b - a) {
        const n = readSync(fd, out, a + got, b - a - got, job.fileOffset + off + a + got);
        if (n <= 0) break;
        got += n;
      }
      if (got < b - a) {
        const at = job.fileOffset + off + a + got;
        throw new ImageError(`${job.file}: short read at byte ${at} (the file shrank while it was pushed?)`, { path: job.file, offset: at });
      }
      for (let q = p; q < e; q++) {
        const page = out.subarray(q * PAGE, Math.min(len, (q + 1) * PAGE));
        if (page[0] === 0 && Buffer.compare(page, page.length === PAGE ? ZERO_PAGE : new Uint8Array(page.length)) === 0) zeroPages.push(first + q);
        else any = true;
      }
      p = e;
    }
    hashes.push(any ? new Bun.CryptoHasher("sha256").update(out).digest("hex") : null);
  }
  return { from, hashes, zeroPages };
}
