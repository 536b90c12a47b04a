// Writes test images: QEMU mapped-ram files in QEMU's exact layout (plus the expected flat
// contents of every block), and sparse raw memory files. Independent of src/ on purpose, so the
// loader is checked against a second implementation of the format.
//
//   bun test/gen-mapped-ram.ts OUT [--ram-mib N] [--seed N]     a mapped-ram file + OUT.<block>.expect
//   bun test/gen-mapped-ram.ts OUT --raw-mib N [--seed N]       a sparse raw memory file
import { closeSync, ftruncateSync, openSync, writeSync } from "node:fs";
import { prng } from "../src/core/prng.ts";

export const PAGES_ALIGN = 1 << 20;
const HEADER_SIZE = 28;
const RAM_SAVE_FLAG_MEM_SIZE = 0x04;
const RAM_SAVE_FLAG_EOS = 0x10;

/** zero: bit 0, not written. stale: bit 0 but old junk left in the file (the loader must go by the bitmap). */
export type PageKind = "zero" | "stale" | "text" | "random" | "last-byte" | "mid-byte";

export interface GenBlockSpec {
  name: string;
  usedLength: number;
  pageSize?: number; // default 4096
  fill?: "mixed" | "zero" | "data"; // default mixed
  postcopyPageSize?: number; // written after used_length, as QEMU does with postcopy-ram and huge pages
  address?: number; // written when the capabilities include x-ignore-shared (default 0)
}

export interface MappedRamGenOptions {
  ramMiB?: number; // size of pc.ram in the default block list (default 32)
  seed?: number;
  blocks?: GenBlockSpec[]; // replaces the default block list
  machine?: string;
  capabilities?: string[]; // default ["mapped-ram"]
  expect?: boolean; // write OUT.<block>.expect files (default true)
}

export interface GeneratedBlock {
  name: string;
  usedLength: number;
  pageSize: number;
  pages: number;
  recordOffset: number;
  headerOffset: number;
  bitmapOffset: number;
  pagesOffset: number;
  bitmap: Uint8Array; // as written: 1 = page present
  kinds: PageKind[];
  dataPages: number; // bits set (block pages)
  zeroPages: number;
  expectFile?: string;
}

export interface GeneratedMappedRam {
  path: string;
  fileSize: number;
  totalRam: number;
  ramSectionOffset: number;
  totalOffset: number; // where the be64 total | 0x04 is
  endOfBlocks: number; // where the RAM section continues after the last block's pages
  blocks: GeneratedBlock[];
  expectFiles: Record<string, string>; // block name -> path
}

export function defaultBlocks(ramMiB = 32): GenBlockSpec[] {
  return [
    { name: "pc.ram", usedLength: ramMiB * 1024 * 1024 },
    { name: "pc.bios", usedLength: 256 * 1024, fill: "data" },
    { name: "0000:00:02.0/vga.vram", usedLength: 2 * 1024 * 1024 },
    { name: "/rom@etc/acpi/tables", usedLength: 128 * 1024 }, // not a multiple of 1 MiB
    { name: "/rom@etc/table-loader", usedLength: 4096, fill: "data" },
    { name: "/rom@etc/acpi/rsdp", usedLength: 4096, fill: "zero" },
  ];
}

export function sanitizeBlockName(name: string): string {
  return name.replace(/[^A-Za-z0-9._-]/g, "_");
}

export function generateMappedRam(out: string, opts: MappedRamGenOptions = {}): GeneratedMappedRam {
  const rand = prng(opts.seed ?? 1);
  const specs = opts.blocks ?? defaultBlocks(opts.ramMiB ?? 32);
  const totalRam = specs.reduce((s, b) => s + b.usedLength, 0);

  // Stream header and configuration section, as qemu_savevm_state_header writes them.
  const head = new Bytes();
  head.ascii("QEVM").be32(3);
  const machine = opts.machine ?? "pc-i440fx-10.0";
  head.u8(0x07).be32(machine.length).ascii(machine); // QEMU_VM_CONFIGURATION, vmstate "configuration"
  const caps = opts.capabilities ?? ["mapped-ram"];
  const sub = "configuration/capabilities";
  head.u8(0x05).u8(sub.length).ascii(sub).be32(1).be32(caps.length); // QEMU_VM_SUBSECTION
  for (const c of caps) head.u8(c.length).ascii(c);
  const ramSectionOffset = head.length;
  head.u8(0x01).be32(2).u8(3).ascii("ram").be32(0).be32(4); // QEMU_VM_SECTION_START "ram" v4
  const totalOffset = head.length;
  head.be64(totalRam + RAM_SAVE_FLAG_MEM_SIZE);

  const fd = openSync(out, "w");
  const blocks: GeneratedBlock[] = [];
  const expectFiles: Record<string, string> = {};
  try {
    writeAt(fd, head.bytes(), 0);
    let pos = head.length;
    for (const spec of specs) {
      const pageSize = spec.pageSize ?? 4096;
      const pages = Math.floor(spec.usedLength / pageSize);
      const rec = new Bytes();
      rec.u8(spec.name.length).ascii(spec.name).be64(spec.usedLength);
      if (spec.postcopyPageSize !== undefined) rec.be64(spec.postcopyPageSize);
      if (caps.includes("x-ignore-shared")) rec.be64(spec.address ?? 0);
      const headerOffset = pos + rec.length;
      const bitmapOffset = headerOffset + HEADER_SIZE;
      const bitmapSize = Math.ceil(pages / 64) * 8; // BITS_TO_LONGS(num_pages) * sizeof(long)
      const pagesOffset = Math.ceil((bitmapOffset + bitmapSize) / PAGES_ALIGN) * PAGES_ALIGN;
      rec.be32(1).be64(pageSize).be64(bitmapOffset).be64(pagesOffset);

      const kinds = chooseKinds(pages, spec.fill ?? "mixed", rand);
      const bitmap = new Uint8Array(bitmapSize);
      const expect = Buffer.alloc(spec.usedLength);
      const junk = Buffer.alloc(pageSize);
      for (let i = 0; i < pages; i++) {
        const kind = kinds[i]!;
        if (kind === "zero") continue;
        if (kind === "stale") {
          fillPage(junk, "random", spec.name, i, rand);
          writeAt(fd, junk, pagesOffset + i * pageSize);
          continue;
        }
        bitmap[i >> 3]! |= 1 << (i & 7);
        fillPage(expect.subarray(i * pageSize, (i + 1) * pageSize), kind, spec.name, i, rand);
      }
      writeAt(fd, rec.bytes(), pos);
      writeAt(fd, bitmap, bitmapOffset);
      writeDataRuns(fd, expect, kinds, pageSize, pagesOffset);

      const dataPages = kinds.filter((k) => k !== "zero" && k !== "stale").length;
      const block: GeneratedBlock = {
        name: spec.name,
        usedLength: spec.usedLength,
        pageSize,
        pages,
        recordOffset: pos,
        headerOffset,
        bitmapOffset,
        pagesOffset,
        bitmap,
        kinds,
        dataPages,
        zeroPages: pages - dataPages,
      };
      if (opts.expect ?? true) {
        const file = `${out}.${sanitizeBlockName(spec.name)}.expect`;
        const efd = openSync(file, "w");
        try {
          ftruncateSync(efd, spec.usedLength); // zero pages stay holes
          writeDataRuns(efd, expect, kinds, pageSize, 0);
        } finally {
          closeSync(efd);
        }
        block.expectFile = file;
        expectFiles[spec.name] = file;
      }
      blocks.push(block);
      pos = pagesOffset + spec.usedLength;
    }

    // The rest of the stream: RAM_SAVE_FLAG_EOS, then stand-in device state and QEMU_VM_EOF.
    const endOfBlocks = pos;
    const tail = new Bytes();
    tail.be64(RAM_SAVE_FLAG_EOS).u8(0x04).be32(3).u8(6).ascii("timer0").be32(0).be32(2);
    for (let i = 0; i < 3000; i++) tail.u8(Math.floor(rand() * 256));
    tail.u8(0x00);
    writeAt(fd, tail.bytes(), pos);
    return {
      path: out,
      fileSize: pos + tail.length,
      totalRam,
      ramSectionOffset,
      totalOffset,
      endOfBlocks,
      blocks,
      expectFiles,
    };
  } finally {
    closeSync(fd);
  }
}

export interface GeneratedRaw {
  path: string;
  size: number;
  pages: number; // ceil(size / 4096)
  kinds: PageKind[]; // never "stale": zero pages are real holes
  dataPages: number;
  zeroPages: number;
}

/** A sparse raw memory file: zero pages are holes (ftruncate, then only data pages written). */
export function generateRawImage(out: string, sizeBytes: number, seed = 1): GeneratedRaw {
  const rand = prng(seed);
  const pages = Math.ceil(sizeBytes / 4096);
  const kinds = chooseKinds(pages, "mixed", rand).map((k) => (k === "stale" ? "zero" : k));
  const fd = openSync(out, "w");
  try {
    ftruncateSync(fd, sizeBytes);
    const page = Buffer.alloc(4096);
    for (let i = 0; i < pages; i++) {
      const kind = kinds[i]!;
      if (kind === "zero") continue;
      const len = Math.min(4096, sizeBytes - i * 4096);
      page.fill(0);
      fillPage(page.subarray(0, len), kind, "raw", i, rand);
      writeAt(fd, page.subarray(0, len), i * 4096);
    }
  } finally {
    closeSync(fd);
  }
  const dataPages = kinds.filter((k) => k !== "zero").length;
  return { path: out, size: sizeBytes, pages, kinds, dataPages, zeroPages: pages - dataPages };
}

// ---- content --------------------------------------------------------------------------------

function chooseKinds(pages: number, fill: "mixed" | "zero" | "data", rand: () => number): PageKind[] {
  const kinds: PageKind[] = [];
  const table: [PageKind, number][] =
    fill === "zero"
      ? [["zero", 1]]
      : fill === "data"
        ? [["text", 0.4], ["random", 0.4], ["last-byte", 0.1], ["mid-byte", 0.1]]
        : [["zero", 0.4], ["stale", 0.06], ["text", 0.18], ["random", 0.2], ["last-byte", 0.08], ["mid-byte", 0.08]];
  while (kinds.length < pages) {
    let x = rand();
    let kind = table[table.length - 1]![0];
    for (const [k, w] of table) {
      if (x < w) {
        kind = k;
        break;
      }
      x -= w;
    }
    // Runs of 1..12 pages, like real memory (long zero runs, clusters of data).
    const run = 1 + Math.floor(rand() * 12);
    for (let i = 0; i < run && kinds.length < pages; i++) kinds.push(kind);
  }
  return kinds;
}

const TEXT = "The quick brown fox jumps over the lazy dog. snapload test page ";

function fillPage(buf: Uint8Array, kind: PageKind, block: string, page: number, rand: () => number): void {
  switch (kind) {
    case "zero":
    case "stale":
      if (kind === "stale") for (let i = 0; i < buf.length; i++) buf[i] = 1 + Math.floor(rand() * 255);
      return;
    case "text": {
      const line = Buffer.from(`${block}#${page}: ${TEXT}`);
      for (let i = 0; i < buf.length; i++) buf[i] = line[i % line.length]!;
      return;
    }
    case "random": {
      // 32 random bits per word keeps this fast enough for tens of MiB.
      const words = Math.floor(buf.length / 4);
      const view = new DataView(buf.buffer, buf.byteOffset, buf.length);
      for (let i = 0; i < words; i++) view.setUint32(i * 4, (rand() * 0x1_0000_0000) >>> 0, true);
      for (let i = words * 4; i < buf.length; i++) buf[i] = Math.floor(rand() * 256);
      return;
    }
    case "last-byte":
      buf[buf.length - 1] = 1 + Math.floor(rand() * 255);
      return;
    case "mid-byte":
      buf[Math.floor(rand() * buf.length)] = 1 + Math.floor(rand() * 255);
      return;
  }
}

/** Writes each run of present pages (bitmap 1) of `data` in one call, at base + page * pageSize. */
function writeDataRuns(fd: number, data: Buffer, kinds: PageKind[], pageSize: number, base: number): void {
  const present = (k: PageKind | undefined) => k !== undefined && k !== "zero" && k !== "stale";
  for (let i = 0; i < kinds.length; ) {
    if (!present(kinds[i])) {
      i++;
      continue;
    }
    let j = i;
    while (present(kinds[j])) j++;
    writeAt(fd, data.subarray(i * pageSize, j * pageSize), base + i * pageSize);
    i = j;
  }
}

function writeAt(fd: number, data: Uint8Array, position: number): void {
  let done = 0;
  while (done < data.length) done += writeSync(fd, data, done, data.length - done, position + done);
}


/** Big-endian byte builder for the stream's header fields. */
class Bytes {
  readonly #out: number[] = [];
  get length(): number {
    return this.#out.length;
  }
  u8(v: number): this {
    this.#out.push(v & 0xff);
    return this;
  }
  be32(v: number): this {
    for (let s = 24; s >= 0; s -= 8) this.#out.push((v >>> s) & 0xff);
    return this;
  }
  be64(v: number): this {
    return this.be32(Math.floor(v / 0x1_0000_0000)).be32(v >>> 0);
  }
  ascii(s: string): this {
    for (const b of Buffer.from(s, "utf8")) this.#out.push(b);
    return this;
  }
  bytes(): Uint8Array {
    return Uint8Array.from(this.#out);
  }
}

// ---- CLI --------------------------------------------------------------------------------------

if (import.meta.main) {
  const args = process.argv.slice(2);
  const flag = (name: string) => {
    const i = args.indexOf(name);
    if (i < 0) return undefined;
    const v = Number(args[i + 1]);
    if (!Number.isFinite(v) || v <= 0) throw new Error(`${name} needs a positive number`);
    args.splice(i, 2);
    return v;
  };
  const ramMiB = flag("--ram-mib");
  const rawMiB = flag("--raw-mib");
  const seed = flag("--seed");
  const out = args[0];
  if (!out || args.length !== 1) {
    console.error("usage: bun test/gen-mapped-ram.ts OUT [--ram-mib N] [--seed N]\n       bun test/gen-mapped-ram.ts OUT --raw-mib N [--seed N]");
    process.exit(2);
  }
  if (rawMiB !== undefined) {
    const r = generateRawImage(out, Math.round(rawMiB * 1024 * 1024), seed ?? 1);
    console.log(`${out}: raw, ${r.size} bytes, ${r.dataPages} data pages, ${r.zeroPages} zero pages (holes)`);
  } else {
    const g = generateMappedRam(out, { ramMiB: ramMiB ?? 32, seed: seed ?? 1 });
    console.log(`${out}: mapped-ram, ${g.fileSize} bytes, total RAM ${g.totalRam}`);
    for (const b of g.blocks) {
      console.log(`  ${b.name}: ${b.usedLength} bytes, ${b.dataPages}/${b.pages} pages present, pages at 0x${b.pagesOffset.toString(16)} -> ${b.expectFile}`);
    }
  }
}
