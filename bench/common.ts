// What every scenario shares: options, the scratch directory, images, feature flags, rows.
import { closeSync, existsSync, fsyncSync, openSync, renameSync, writeSync } from "node:fs";
import { prng } from "../src/core/prng.ts";

export { prng };
import { randomFillSync } from "node:crypto";
import { writeDemoImage } from "../src/cli/demo-image.ts";

export interface BenchOptions {
  quick: boolean;
  runs: number;
  only: Set<string> | undefined;
}

/** What `snapload help` says exists today (other engineers are adding these). */
export interface Features {
  record: boolean;
  prefetch: boolean;
  populate: boolean;
  pageServer: boolean;
}

export interface Ctx {
  opts: BenchOptions;
  dir: string;
  features: Features;
  /** A random-data image of `mib` MiB (made once per run, page cache warm). */
  image(mib: number): string;
  /**
   * A realistic image of `mib` MiB (src/cli/demo-image.ts: ~40% zero pages left as file holes, text,
   * random bytes, sparse pages), made once per run.
   */
  demoImage(mib: number): string;
  /** A fresh socket path in the scratch directory. */
  socket(tag: string): string;
  log(msg: string): void;
}

/** One line of the markdown table. */
export interface Row {
  what: string;
  median?: string;
  best?: string;
  result?: string;
  target?: string;
}

/** A small extra table a scenario renders under the main one (e.g. a sweep: rows × columns). */
export interface ExtraTable {
  title: string;
  header: string[];
  rows: string[][];
}

export interface ScenarioResult {
  id: string;
  title: string;
  status: "ok" | "partial" | "skipped" | "failed";
  notes: string[];
  rows: Row[];
  tables?: ExtraTable[];
  data: Record<string, unknown>;
  error?: string;
}

export type Scenario = (ctx: Ctx) => Promise<ScenarioResult>;

// ---- numbers ---------------------------------------------------------------------------------

export interface Summary {
  median: number;
  min: number;
  max: number;
  values: number[];
}

export function summarize(values: number[]): Summary {
  const s = [...values].sort((a, b) => a - b);
  const n = s.length;
  const median = n === 0 ? NaN : n % 2 ? s[(n - 1) >> 1]! : (s[n / 2 - 1]! + s[n / 2]!) / 2;
  return { median, min: s[0] ?? NaN, max: s[n - 1] ?? NaN, values };
}

export function fmtTime(ns: number): string {
  if (!Number.isFinite(ns)) return "–";
  if (ns >= 1e9) return `${(ns / 1e9).toFixed(2)} s`;
  if (ns >= 1e6) return `${(ns / 1e6).toFixed(ns >= 1e8 ? 0 : 1)} ms`;
  if (ns >= 1e3) return `${(ns / 1e3).toFixed(1)} µs`;
  return `${ns.toFixed(0)} ns`;
}

export function fmtRate(bytesPerSec: number): string {
  if (!Number.isFinite(bytesPerSec)) return "–";
  return bytesPerSec >= 1e9 ? `${(bytesPerSec / 1e9).toFixed(2)} GB/s` : `${(bytesPerSec / 1e6).toFixed(0)} MB/s`;
}

export function fmtCount(n: number): string {
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return n.toFixed(0);
}

export function fmtKiB(kib: number): string {
  return `${(kib / 1024).toFixed(1)} MiB`;
}

export const check = (ok: boolean) => (ok ? "✅" : "❌");

// ---- images and orders -----------------------------------------------------------------------

export const PAGE = 4096;
export const MiB = 1024 * 1024;

/** Writes `mib` MiB of random bytes (not compressible, no zero pages) unless the file exists. */
export function makeRandomImage(path: string, mib: number): void {
  if (existsSync(path)) return;
  const chunk = Buffer.allocUnsafe(16 * MiB);
  const tmp = `${path}.partial`;
  const fd = openSync(tmp, "w");
  try {
    for (let left = mib * MiB; left > 0; left -= chunk.length) {
      const n = Math.min(left, chunk.length);
      randomFillSync(chunk, 0, n);
      let off = 0;
      while (off < n) off += writeSync(fd, chunk, off, n - off);
    }
    fsyncSync(fd); // no writeback of dirty pages in the middle of a measurement
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
}

/** `writeDemoImage` (src/cli/demo-image.ts) of `mib` MiB unless the file exists; synced, then renamed into place. */
export function makeDemoImage(path: string, mib: number, seed = 42): { pages: number; zeroPages: number } | undefined {
  if (existsSync(path)) return undefined;
  const tmp = `${path}.partial`;
  const stats = writeDemoImage(tmp, mib * MiB, seed);
  const fd = openSync(tmp, "r+");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  return stats;
}


export function shuffle(a: Uint32Array, seed: number): Uint32Array {
  const rnd = prng(seed);
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    const t = a[i]!;
    a[i] = a[j]!;
    a[j] = t;
  }
  return a;
}

/** Order file for `--order file:PATH`: little-endian u32 page indexes. */
export async function writeOrder(path: string, order: Uint32Array): Promise<void> {
  const out = new Uint8Array(order.length * 4);
  const v = new DataView(out.buffer);
  for (let i = 0; i < order.length; i++) v.setUint32(i * 4, order[i]!, true);
  await Bun.write(path, out);
}

/** Pages 0..n-1. */
export function allPages(n: number): Uint32Array {
  const a = new Uint32Array(n);
  for (let i = 0; i < n; i++) a[i] = i;
  return a;
}

/** A scattered set: `count` random single pages of `pages`, in random order. */
export function scatteredSet(pages: number, count: number, seed: number): Uint32Array {
  return shuffle(allPages(pages), seed).slice(0, count);
}

/**
 * A clustered set: ceil(count / run) runs of `run` consecutive pages at random, non-overlapping,
 * unaligned positions (at least one page apart), every page of every run in one random order
 * (random within each run and across runs).
 */
export function clusteredSet(pages: number, count: number, run: number, seed: number): Uint32Array {
  const runs = Math.ceil(count / run);
  const slack = pages - runs * run; // free pages to spread between the runs
  if (slack < runs) throw new Error(`clusteredSet: ${runs} runs of ${run} pages do not fit in ${pages} pages`);
  // Distinct sorted offsets in [0, slack]: run i starts at offset_i + i*run, so gaps are >= 1 page.
  const starts = shuffle(allPages(slack + 1), seed).slice(0, runs).sort();
  const out = new Uint32Array(runs * run);
  for (let i = 0; i < runs; i++) for (let k = 0; k < run; k++) out[i * run + k] = starts[i]! + i * run + k;
  return shuffle(out, seed ^ 0x5a5a5a5a);
}
