// A demo memory image with the mix a real guest has: zero pages (left as file holes),
// text, random bytes, and sparse pages. Written in 1 MiB chunks, so memory stays flat.
import { closeSync, ftruncateSync, openSync, writeSync } from "node:fs";
import { prng } from "../core/prng.ts";

const PAGE = 4096;
const CHUNK = 256; // pages per write

export interface DemoImageStats {
  pages: number;
  zeroPages: number;
}

export function writeDemoImage(path: string, bytes: number, seed = 42): DemoImageStats {
  const pages = Math.floor(bytes / PAGE);
  const fd = openSync(path, "w");
  ftruncateSync(fd, pages * PAGE);
  // Deterministic: the same seed makes the same image.
  const rnd = prng(seed);
  const rand32 = () => (rnd() * 4294967296) >>> 0;
  const text = new TextEncoder().encode("snapload demo: every page a guest reads must equal the snapshot's page. ");
  const chunk = new Uint8Array(CHUNK * PAGE);
  const words = new Uint32Array(chunk.buffer);
  let zeroPages = 0;
  for (let first = 0; first < pages; first += CHUNK) {
    const n = Math.min(CHUNK, pages - first);
    chunk.fill(0);
    const zero = new Uint8Array(n);
    for (let k = 0; k < n; k++) {
      const kind = rand32() % 10;
      const off = k * PAGE;
      if (kind < 4) zero[k] = 1; // 40% zero pages, as in a lightly used guest
      else if (kind < 6) for (let i = 0; i < PAGE; i++) chunk[off + i] = text[(first + k + i) % text.length]!;
      else if (kind < 9) for (let i = 0; i < PAGE / 4; i++) words[off / 4 + i] = rand32();
      else chunk[off + (rand32() % PAGE)] = 1 + (rand32() % 255); // one stray byte
    }
    // Zero pages are skipped, not written: they stay holes the loader finds with SEEK_HOLE.
    let k = 0;
    while (k < n) {
      if (zero[k]) {
        zeroPages++;
        k++;
        continue;
      }
      let e = k + 1;
      while (e < n && !zero[e]) e++;
      writeSync(fd, chunk, k * PAGE, (e - k) * PAGE, (first + k) * PAGE);
      k = e;
    }
  }
  closeSync(fd);
  return { pages, zeroPages };
}
