// Memory images: raw files (holes = zero pages) and QEMU mapped-ram files (bitmap = zero pages),
// checked against the independent generator in gen-mapped-ram.ts.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { toArrayBuffer, type Pointer } from "bun:ffi";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError, ImageError, openImage, SnaploadError, type SnapshotImage, SyscallError, ZeroMap } from "../src/index.ts";
import { openMappedRamImage, parseMappedRam } from "../src/sources/image/mapped-ram.ts";
import { openRawImage } from "../src/sources/image/raw-image.ts";
import { IMAGE_PAGE } from "../src/sources/image/snapshot-image.ts";
import { inspectImage, inspectReport } from "../src/cli/inspect-file.ts";
import { prng } from "../src/core/prng.ts";
import { generateMappedRam, generateRawImage, type GenBlockSpec, type GeneratedMappedRam } from "./gen-mapped-ram.ts";
import { patchFile } from "./harness.ts";

const MiB = 1024 * 1024;
let dir = "";
let n = 0;
const fresh = (name: string) => join(dir, `${n++}-${name}`);

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "snapload-image-"));
});
afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** A view of the image's mapping; fine in a test, never done on the fault path. */
function mapped(image: SnapshotImage, len: number): Uint8Array {
  return new Uint8Array(toArrayBuffer(image.base as Pointer, 0, len));
}

const be32 = (v: number) => [v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
const be64 = (v: number) => [...be32(Math.floor(v / 0x1_0000_0000)), ...be32(v >>> 0)];

function refusal(fn: () => unknown, fragment: string, path: string): ImageError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(ImageError);
  const err = caught as ImageError;
  expect(err.code).toBe("BAD_IMAGE");
  expect(err.message).toContain(fragment);
  expect(err.context.path).toBe(path);
  return err;
}

describe("ZeroMap", () => {
  test("scans agree with a plain per-page reference", () => {
    const pages = 1000;
    const ref: boolean[] = [];
    const map = new ZeroMap(pages);
    const rand = prng(7);
    for (let p = 0; p < pages; ) {
      const run = 1 + Math.floor(rand() * 70);
      const zero = rand() < 0.5;
      const first = p;
      for (let i = 0; i < run && p < pages; i++, p++) ref.push(zero);
      // Long runs through the word-filling path, short ones bit by bit.
      if (zero && run > 40) map.setZeroRange(first, p - first);
      else if (zero) for (let q = first; q < p; q++) map.setZero(q);
    }
    map.setZeroRange(0, 0); // an empty range is allowed
    expect(map.countZero()).toBe(ref.filter(Boolean).length);
    for (let p = 0; p < pages; p++) expect(map.isZero(p)).toBe(ref[p]!);
    for (let t = 0; t < 300; t++) {
      const from = Math.floor(rand() * pages);
      const limit = from + Math.floor(rand() * (pages - from + 1));
      let d = from;
      while (d < limit && ref[d]) d++;
      let z = from;
      while (z < limit && !ref[z]) z++;
      expect(map.nextData(from, limit)).toBe(d);
      expect(map.nextZero(from, limit)).toBe(z);
      expect(map.isRangeZero(from, limit - from)).toBe(d === limit);
    }
    const runs = [...map.runs(0, pages)];
    expect(runs.reduce((s, r) => s + r.count, 0)).toBe(pages);
    for (const r of runs) for (let p = r.first; p < r.first + r.count; p++) expect(ref[p]).toBe(r.zero);
    expect(() => map.isZero(pages)).toThrow(ImageError);
  });
});

describe("raw image", () => {
  test("zero pages are exactly the holes; data pages read back as written", () => {
    const path = fresh("raw");
    const size = 16 * MiB + 1234; // a partial last page too
    const gen = generateRawImage(path, size, 3);
    const image = openRawImage(path);
    try {
      expect(image.format).toBe("raw");
      expect(image.size).toBe(size);
      expect(image.zero.pages).toBe(gen.pages);
      const got = gen.kinds.map((_, p) => image.zero.isZero(p));
      expect(got).toEqual(gen.kinds.map((k) => k === "zero"));
      expect(image.zeroPages).toBe(gen.zeroPages);
      expect(image.dataPages).toBe(gen.dataPages);
      expect(gen.zeroPages).toBeGreaterThan(100);
      const file = readFileSync(path);
      const view = mapped(image, size);
      let compared = 0;
      for (let p = 0; p < gen.pages; p++) {
        if (image.zero.isZero(p)) continue;
        const a = view.subarray(p * IMAGE_PAGE, Math.min(size, (p + 1) * IMAGE_PAGE));
        const b = file.subarray(p * IMAGE_PAGE, Math.min(size, (p + 1) * IMAGE_PAGE));
        if (Buffer.compare(a, b) !== 0) throw new Error(`page ${p} differs`);
        compared++;
      }
      expect(compared).toBe(gen.dataPages);
    } finally {
      image.close();
      image.close(); // idempotent
    }
    expect(() => image.base).toThrow(ImageError);
  });

  test("a file without holes has no zero pages, even where the bytes are zero", () => {
    const path = fresh("dense");
    writeFileSync(path, Buffer.alloc(3 * IMAGE_PAGE));
    const image = openRawImage(path);
    expect(image.zeroPages).toBe(0);
    expect(image.dataPages).toBe(3);
    image.close();
  });

  test("the partial last page is zero only when the hole reaches EOF", () => {
    const holes = fresh("holes");
    writeFileSync(holes, "");
    truncateSync(holes, 2 * IMAGE_PAGE + 100); // all hole
    const a = openRawImage(holes);
    expect([0, 1, 2].map((p) => a.zero.isZero(p))).toEqual([true, true, true]);
    a.close();
    const tail = fresh("tail");
    writeFileSync(tail, "");
    truncateSync(tail, 2 * IMAGE_PAGE + 100);
    patchFile(tail, 2 * IMAGE_PAGE + 99, [7]); // data in the partial page only
    const b = openRawImage(tail);
    expect([0, 1, 2].map((p) => b.zero.isZero(p))).toEqual([true, true, false]);
    expect(mapped(b, 2 * IMAGE_PAGE + 100)[2 * IMAGE_PAGE + 99]).toBe(7);
    b.close();
  });

  test("refuses empty files and non-regular files", () => {
    const empty = fresh("empty");
    writeFileSync(empty, "");
    refusal(() => openRawImage(empty), "empty", empty);
    const sub = fresh("dir");
    mkdirSync(sub);
    refusal(() => openRawImage(sub), "not a regular file", sub);
    expect(() => openRawImage(join(dir, "missing"))).toThrow(SyscallError);
  });
});

describe("mapped-ram image", () => {
  let gen: GeneratedMappedRam;
  beforeAll(() => {
    gen = generateMappedRam(fresh("snap"), { ramMiB: 32, seed: 11 });
  });

  test("parse reports every block as written", () => {
    const file = parseMappedRam(gen.path);
    expect(file.totalRam).toBe(gen.totalRam);
    expect(file.ramSectionOffset).toBe(gen.ramSectionOffset);
    expect(file.blocks.map((b) => b.name)).toEqual(gen.blocks.map((b) => b.name));
    for (const [i, b] of file.blocks.entries()) {
      const g = gen.blocks[i]!;
      expect(b).toEqual({
        name: g.name,
        usedLength: g.usedLength,
        pageSize: g.pageSize,
        recordOffset: g.recordOffset,
        headerOffset: g.headerOffset,
        bitmapOffset: g.bitmapOffset,
        pagesOffset: g.pagesOffset,
        pages: g.pages,
        dataPages: g.dataPages,
        zeroPages: g.zeroPages,
      });
    }
    // The layout QEMU 10.0 wrote for pc.ram (shared/docs/qemu-mapped-ram.md): record 0x63, bitmap 0x8e.
    expect(file.blocks[0]!.recordOffset).toBe(0x63);
    expect(file.blocks[0]!.bitmapOffset).toBe(0x8e);
    expect(file.blocks[0]!.pagesOffset).toBe(0x100000);
  });

  test("every block: zero map equals the bitmap, data pages equal the expected contents", () => {
    for (const g of gen.blocks) {
      const image = openMappedRamImage(gen.path, g.name);
      try {
        expect(image.format).toBe("mapped-ram");
        expect(image.blockName).toBe(g.name);
        expect(image.size).toBe(g.usedLength);
        expect(image.blocks?.length).toBe(gen.blocks.length);
        const bits = Array.from({ length: g.pages }, (_, i) => ((g.bitmap[i >> 3]! >> (i & 7)) & 1) === 0);
        expect(Array.from({ length: g.pages }, (_, i) => image.zero.isZero(i))).toEqual(bits);
        expect(image.zeroPages).toBe(g.zeroPages);
        const want = readFileSync(gen.expectFiles[g.name]!);
        expect(want.length).toBe(g.usedLength);
        if (image.dataPages === 0) continue;
        const view = mapped(image, g.usedLength);
        for (let p = 0; p < g.pages; p++) {
          const a = want.subarray(p * IMAGE_PAGE, (p + 1) * IMAGE_PAGE);
          if (image.zero.isZero(p)) {
            if (a.some((x) => x !== 0)) throw new Error(`${g.name}: zero page ${p} has data in the expect file`);
            continue;
          }
          if (Buffer.compare(view.subarray(p * IMAGE_PAGE, (p + 1) * IMAGE_PAGE), a) !== 0) {
            throw new Error(`${g.name}: page ${p} differs`);
          }
        }
      } finally {
        image.close();
      }
    }
  });

  test("stale data behind a cleared bit is reported zero (the bitmap wins over the file)", () => {
    const ram = gen.blocks[0]!;
    const stale = ram.kinds.indexOf("stale");
    expect(stale).toBeGreaterThanOrEqual(0);
    const image = openMappedRamImage(gen.path);
    try {
      expect(image.zero.isZero(stale)).toBe(true);
      const raw = mapped(image, (stale + 1) * IMAGE_PAGE).subarray(stale * IMAGE_PAGE);
      expect(raw.some((x) => x !== 0)).toBe(true); // the junk is really there in the file
    } finally {
      image.close();
    }
  });

  test("block page sizes that are multiples of 4 KiB expand to 4 KiB zero pages", () => {
    const path = fresh("bigpage");
    const g = generateMappedRam(path, {
      blocks: [
        { name: "mach-virt.ram", usedLength: 4 * MiB, pageSize: 16384 },
        { name: "tiny", usedLength: 64 * 1024, pageSize: 16384 },
      ],
      seed: 5,
    });
    const image = openMappedRamImage(path);
    try {
      expect(image.blockName).toBe("mach-virt.ram");
      expect(image.zero.pages).toBe((4 * MiB) / IMAGE_PAGE);
      const b = g.blocks[0]!;
      for (let p = 0; p < image.zero.pages; p++) {
        const big = Math.floor(p / 4);
        expect(image.zero.isZero(p)).toBe(((b.bitmap[big >> 3]! >> (big & 7)) & 1) === 0);
      }
      expect(image.zeroPages).toBe(b.zeroPages * 4);
      const want = readFileSync(g.expectFiles["mach-virt.ram"]!);
      const view = mapped(image, image.size);
      for (let p = 0; p < image.zero.pages; p++) {
        if (image.zero.isZero(p)) continue;
        const range = [p * IMAGE_PAGE, (p + 1) * IMAGE_PAGE] as const;
        if (Buffer.compare(view.subarray(...range), want.subarray(...range)) !== 0) throw new Error(`page ${p} differs`);
      }
    } finally {
      image.close();
    }
  });

  test("optional record fields: postcopy page size and x-ignore-shared address", () => {
    const path = fresh("optional");
    const g = generateMappedRam(path, {
      capabilities: ["x-ignore-shared", "mapped-ram"],
      blocks: [
        // An address whose high word is 1 looks like a header version: the parser must not be fooled.
        { name: "pc.ram", usedLength: 4 * MiB, postcopyPageSize: 2 * MiB, address: 0x1_0000_0000 },
        { name: "pc.bios", usedLength: 256 * 1024, address: 0xfffc0000 },
      ],
    });
    const file = parseMappedRam(path);
    expect(file.ignoreShared).toBe(true);
    expect(file.blocks.map((b) => [b.name, b.headerOffset, b.pageSize])).toEqual(
      g.blocks.map((b) => [b.name, b.headerOffset, 4096]),
    );
    const plain = fresh("postcopy");
    const h = generateMappedRam(plain, { blocks: [{ name: "pc.ram", usedLength: 2 * MiB, postcopyPageSize: 2 * MiB }] });
    expect(parseMappedRam(plain).blocks[0]!.headerOffset).toBe(h.blocks[0]!.headerOffset);
  });

  test("block selection: largest by default, by name, unknown name lists the blocks", () => {
    const path = fresh("select");
    const blocks: GenBlockSpec[] = [
      { name: "pc.bios", usedLength: 256 * 1024 },
      { name: "pc.ram", usedLength: 8 * MiB },
      { name: "0000:00:02.0/vga.vram", usedLength: 2 * MiB },
    ];
    generateMappedRam(path, { blocks });
    const def = openMappedRamImage(path);
    expect(def.blockName).toBe("pc.ram");
    expect(def.size).toBe(8 * MiB);
    def.close();
    const vga = openImage(path, { ramblock: "0000:00:02.0/vga.vram" });
    expect(vga.blockName).toBe("0000:00:02.0/vga.vram");
    expect(vga.size).toBe(2 * MiB);
    vga.close();
    const err = refusal(() => openMappedRamImage(path, "nope"), 'no RAM block named "nope"', path);
    expect(err.message).toContain('"pc.bios", "pc.ram", "0000:00:02.0/vga.vram"');
  });

  test("openImage detects the format; --ramblock on a raw image is an error", () => {
    const raw = fresh("raw-small");
    generateRawImage(raw, MiB, 2);
    const a = openImage(raw);
    expect(a.format).toBe("raw");
    a.close();
    const b = openImage(gen.path);
    expect(b.format).toBe("mapped-ram");
    expect(b.blockName).toBe("pc.ram");
    b.close();
    let caught: unknown;
    try {
      openImage(raw, { ramblock: "pc.ram" });
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(ConfigError);
    expect((caught as SnaploadError).message).toContain("raw image");
  });

  test("inspect describes the blocks and the default choice", () => {
    const text = inspectImage(gen.path);
    expect(text).toContain("format:     mapped-ram");
    expect(text).toContain("pc.ram (default: the largest block)");
    for (const b of gen.blocks) expect(text).toContain(b.name);
    const chosen = inspectImage(gen.path, { ramblock: "pc.bios" });
    expect(chosen).toContain("default would be pc.ram");
    const json = JSON.parse(inspectImage(gen.path, { json: true }));
    expect(json.defaultBlock).toBe("pc.ram");
    expect(json.blocks).toHaveLength(gen.blocks.length);
    expect(json.dataPages).toBe(gen.blocks[0]!.dataPages);
    const raw = fresh("raw-inspect");
    const g = generateRawImage(raw, 2 * MiB + 100, 4);
    const r = inspectReport(raw);
    expect(r.format).toBe("raw");
    expect(r.zeroPages).toBe(g.zeroPages);
    expect(r.dataBytes + r.zeroBytes).toBe(2 * MiB + 100);
  });
});

describe("mapped-ram refusals", () => {
  const small = (opts: Parameters<typeof generateMappedRam>[1] = {}) =>
    generateMappedRam(fresh("bad"), { ramMiB: 2, expect: false, ...opts });

  test("stream version other than 3", () => {
    const g = small();
    patchFile(g.path, 4, be32(2));
    refusal(() => openImage(g.path), "unsupported QEMU migration stream version 2", g.path);
  });

  test("file cut inside a bitmap", () => {
    const g = small();
    const b = g.blocks[0]!;
    truncateSync(g.path, b.bitmapOffset + 10);
    const err = refusal(() => openImage(g.path), "bitmap", g.path);
    expect(err.message).toContain("truncated");
    expect(err.context.block).toBe("pc.ram");
  });

  test("file cut inside the pages, where a set bit points past EOF", () => {
    const g = small();
    const b = g.blocks[0]!;
    let last = -1;
    for (let i = 0; i < b.pages; i++) if ((b.bitmap[i >> 3]! >> (i & 7)) & 1) last = i;
    truncateSync(g.path, b.pagesOffset + last * 4096 + 100);
    const err = refusal(() => parseMappedRam(g.path), `page ${last} is marked present`, g.path);
    expect(err.message).toContain("past the end of the file");
  });

  test("pages_offset not aligned to 1 MiB", () => {
    const g = small();
    const b = g.blocks[0]!;
    patchFile(g.path, b.headerOffset + 20, be64(b.pagesOffset + 4096));
    const err = refusal(() => openImage(g.path), "not aligned to 1 MiB", g.path);
    expect(err.context.pagesOffset).toBe(b.pagesOffset + 4096);
  });

  test("used lengths that do not add up to the total", () => {
    const more = small();
    patchFile(more.path, more.totalOffset, be64(more.totalRam + 2 * MiB + 4));
    refusal(() => openImage(more.path), `add up to ${more.totalRam} bytes but the total RAM size is`, more.path);
    const less = small();
    patchFile(less.path, less.totalOffset, be64(less.totalRam - 3 * 4096 + 4));
    refusal(() => openImage(less.path), "more than the total RAM size", less.path);
    // A total that equals the sum of the first blocks only: the next record must not be ignored.
    const prefix = small();
    patchFile(prefix.path, prefix.totalOffset, be64(prefix.totalRam - 2 * 4096 + 4));
    refusal(() => openImage(prefix.path), "but another RAM block record follows", prefix.path);
  });

  test("page size 0, page size below 4 KiB, header version other than 1", () => {
    const zero = small();
    patchFile(zero.path, zero.blocks[0]!.headerOffset + 4, be64(0));
    refusal(() => openImage(zero.path), "page size 0 is not a power of two", zero.path);
    const tiny = small();
    patchFile(tiny.path, tiny.blocks[1]!.headerOffset + 4, be64(2048));
    const err = refusal(() => openImage(tiny.path), "page size 2048", tiny.path);
    expect(err.context.block).toBe("pc.bios");
    const v2 = small();
    patchFile(v2.path, v2.blocks[0]!.headerOffset, be32(2));
    refusal(() => openImage(v2.path), "MappedRamHeader version 2", v2.path);
  });

  test("bitmap bits past the last page are ignored", () => {
    const g = small({ blocks: [{ name: "ram", usedLength: 20 * 4096 }, { name: "rom", usedLength: 8192 }] });
    const b = g.blocks[0]!;
    // 20 pages: bits 20..63 of the 8-byte bitmap are padding.
    patchFile(g.path, b.bitmapOffset + 2, [b.bitmap[2]! | 0xf0, 0xff, 0xff, 0xff, 0xff, 0xff]);
    const image = openMappedRamImage(g.path);
    try {
      expect(image.zero.pages).toBe(20);
      expect(image.zeroPages).toBe(b.zeroPages);
      expect(image.blocks![0]!.dataPages).toBe(b.dataPages);
    } finally {
      image.close();
    }
  });

  test("block name running past EOF", () => {
    const g = small();
    const rec = g.blocks[0]!.recordOffset;
    truncateSync(g.path, rec + 4); // name length byte says 6, only 3 name bytes left
    const err = refusal(() => openImage(g.path), "RAM block name (6 bytes)", g.path);
    expect(err.message).toContain("truncated");
    const long = small();
    patchFile(long.path, rec, [255]);
    truncateSync(long.path, rec + 100);
    refusal(() => openImage(long.path), "RAM block name (255 bytes)", long.path);
  });

  test("an absurd used_length or total RAM size is a clear image error, not a failed allocation", () => {
    // 1 GiB block pages keep the bitmap of a huge block small enough to fit in the file.
    const huge = () => small({ blocks: [{ name: "pc.ram", usedLength: 2 * 1024 * MiB, pageSize: 1024 * MiB, fill: "zero" }] });
    const used = huge();
    const b = used.blocks[0]!;
    patchFile(used.path, b.headerOffset - 8, be64(2 ** 50)); // used_length precedes the header here
    const err = refusal(() => openImage(used.path), 'RAM block "pc.ram": used_length 1125899906842624 bytes is larger than the 4 TiB', used.path);
    expect(err.context.block).toBe("pc.ram");
    const total = huge();
    patchFile(total.path, total.totalOffset, be64(2 ** 50 + 4));
    refusal(() => openImage(total.path), "total RAM size 1125899906842624 bytes is larger than the 4 TiB", total.path);
    // A sparse raw file beyond the limit, too.
    const raw = fresh("huge-raw");
    writeFileSync(raw, "x");
    truncateSync(raw, 2 ** 42 + IMAGE_PAGE);
    refusal(() => openImage(raw), "image file of 4398046515200 bytes is larger than the 4 TiB", raw);
  });

  test("no mapped-ram capability, no RAM section", () => {
    const plain = small({ capabilities: ["x-ignore-shared-not"] });
    refusal(() => openImage(plain.path), "mapped-ram capability", plain.path);
    const headOnly = fresh("head-only");
    writeFileSync(headOnly, Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0x07, 0, 0, 0, 2, 0x70, 0x63]));
    refusal(() => openImage(headOnly), "no RAM section", headOnly);
  });
});
