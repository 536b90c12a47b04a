// Images for the store tests and bench: laid out like a guest's memory (long zero stretches,
// kernel text, page tables, some random data), unlike the demo image's evenly mixed pages.
import { closeSync, ftruncateSync, openSync, writeSync } from "node:fs";
import { prng } from "../src/core/prng.ts";

const PAGE = 4096;

/** Regions of 64 pages: 45% all zero, 20% text-like, 20% sparse, 15% random. Holes where zero. */
export function writeGuestLikeImage(path: string, bytes: number, seed: number): void {
  const rnd = prng(seed);
  const fd = openSync(path, "w");
  ftruncateSync(fd, bytes);
  const run = 64 * PAGE;
  const buf = new Uint8Array(run);
  const text = new TextEncoder().encode("mov rax, [rbp-8]; call printk; /* struct task_struct */ ");
  for (let off = 0; off < bytes; off += run) {
    const len = Math.min(run, bytes - off);
    const kind = rnd();
    if (kind < 0.45) continue;
    buf.fill(0);
    if (kind < 0.65) for (let i = 0; i < len; i++) buf[i] = text[(i * 7 + off) % text.length]!;
    else if (kind < 0.85) for (let i = 0; i < len; i += 64) buf[i] = (rnd() * 256) | 0;
    else for (let i = 0; i < len; i++) buf[i] = (rnd() * 256) | 0;
    writeSync(fd, buf, 0, len, off);
  }
  closeSync(fd);
}
