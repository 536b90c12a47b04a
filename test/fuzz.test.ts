// Property-based tests (fast-check) of every parser a peer or a file controls: the handshake
// scanner and parser, the mapped-ram header/record/bitmap parser (real files, mutated), and the
// working-set file format. Whatever the input, a parser answers or refuses with its own typed
// error — never a RangeError, a TypeError or a hang.
//
// `npm test` runs a seeded, bounded pass (about a second). `npm run fuzz` runs 20,000 cases per
// property with a fresh seed (FUZZ_RUNS and FUZZ_SEED=N|random set them; a failure prints the
// seed and path that replay it).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import fc from "fast-check";
import { HandshakeError, SnaploadError } from "../src/core/errors.ts";
import { JsonScanner, MAX_HANDSHAKE_BYTES, PAGE_2M, PAGE_4K, parseHandshake, scanJson } from "../src/sinks/uffd/handshake.ts";
import { openMappedRamImage, parseMappedRam } from "../src/sources/image/mapped-ram.ts";
import { IMAGE_PAGE } from "../src/sources/image/snapshot-image.ts";
import { decodeWorkingSet, encodeWorkingSet, WorkingSetError } from "../src/scheduler/working-set.ts";
import { type GeneratedMappedRam, generateMappedRam } from "./gen-mapped-ram.ts";
import { tempDir } from "./harness.ts";

const RUNS = Number(process.env.FUZZ_RUNS ?? 200);
const SEED = process.env.FUZZ_SEED === "random" ? Date.now() % 2 ** 31 : Number(process.env.FUZZ_SEED ?? 20261202);
if (process.env.FUZZ_SEED === "random") console.log(`fuzz: ${RUNS} runs per property, seed ${SEED} (FUZZ_SEED=${SEED} replays it)`);
const params = { numRuns: RUNS, seed: SEED };
// The long run gives each property more time than bun's default per-test timeout.
const TIMEOUT_MS = Math.max(60_000, RUNS * 50);
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** Refusals must be typed: anything else escaping a parser is a bug. */
function expectTyped(e: unknown, type: new (...a: never[]) => SnaploadError): void {
  if (!(e instanceof type)) throw new Error(`expected a ${type.name}, got ${(e as Error)?.name}: ${(e as Error)?.message}`, { cause: e });
}

// ---- handshake -----------------------------------------------------------------------------------

const region = fc.record(
  {
    base_host_virt_addr: fc.oneof(fc.nat({ max: 2 ** 40 }).map((n) => n * PAGE_4K), fc.maxSafeNat()),
    size: fc.oneof(fc.integer({ min: 1, max: 4096 }).map((n) => n * PAGE_4K), fc.maxSafeNat()),
    offset: fc.oneof(fc.nat({ max: 1 << 20 }).map((n) => n * PAGE_4K), fc.maxSafeNat()),
    page_size: fc.constantFrom(PAGE_4K, PAGE_2M, 65536, 0),
    page_size_kib: fc.constantFrom(PAGE_4K, PAGE_2M),
    gpa_start: fc.nat(),
    // Unknown fields of any shape; integers past 2^53 are refused by design (tested apart below).
    future: fc.jsonValue({ maxDepth: 3 }).filter((v) => !/\d{16,}/.test(JSON.stringify(v))),
  },
  { requiredKeys: ["base_host_virt_addr", "size", "offset"] },
);
const body = fc.array(region, { minLength: 0, maxLength: 6 });

/** Whitespace JSON allows between tokens, inserted at random token boundaries. */
function spaced(text: string, seed: number): string {
  const ws = [" ", "\n", "\t", "\r\n "];
  return text.replace(/[,:[\]{}]/g, (m, i: number) => ((i * 31 + seed) % 5 === 0 ? `${m}${ws[(i + seed) % ws.length]}` : m));
}

/** What the server does with bytes once the scanner says they are complete. */
function serverParse(bytes: Uint8Array, end: number) {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(0, end));
  } catch {
    return "not utf-8";
  }
  try {
    return parseHandshake(text);
  } catch (e) {
    expectTyped(e, HandshakeError);
    return e as HandshakeError;
  }
}

/** Scans `bytes` fed in reads of the given sizes, as recvmsg would deliver them. */
function scanInPieces(bytes: Uint8Array, cuts: number[]) {
  const scanner = new JsonScanner();
  let at = 0;
  let r = scanner.feed(bytes, 0);
  for (const c of cuts) {
    at = Math.min(bytes.length, at + c);
    r = scanner.feed(bytes, at);
    if (r.state === "invalid") return r;
  }
  return at < bytes.length ? scanner.feed(bytes, bytes.length) : r;
}

describe("fuzz: handshake", () => {
  test("any bytes, cut into any reads: the scanner answers as one whole scan would, and never throws", () => {
    const bytes = fc.oneof(
      fc.uint8Array({ maxLength: 512 }),
      fc.string({ unit: fc.constantFrom(..."[]{}\",:\\ 0123456789-+.eE\ntruefalsnul"), maxLength: 300 }).map((s) => new TextEncoder().encode(s)),
    );
    fc.assert(
      fc.property(bytes, fc.array(fc.integer({ min: 1, max: 64 }), { maxLength: 40 }), (b, cuts) => {
        const whole = scanJson(b);
        expect(scanInPieces(b, cuts)).toEqual(whole);
        if (whole.state === "complete") {
          expect(whole.end).toBeLessThanOrEqual(b.length);
          serverParse(b, whole.end);
        }
      }),
      params,
    );
  }, TIMEOUT_MS);

  test("generated bodies: complete exactly at their end, and accepted regions keep every invariant", () => {
    fc.assert(
      fc.property(body, fc.nat(), (regions, seed) => {
        const text = spaced(JSON.stringify(regions), seed);
        const bytes = new TextEncoder().encode(`${text} \n`);
        const scan = scanJson(bytes);
        // The array ends at its last "]" (whitespace may follow it).
        expect(scan).toEqual({ state: "complete", end: new TextEncoder().encode(text.trimEnd()).length });
        const r = serverParse(bytes, (scan as { end: number }).end);
        if (!Array.isArray(r)) return;
        expect(r.length).toBe(regions.length);
        const sorted = [...r].sort((a, b) => a.base - b.base);
        sorted.forEach((g, i) => {
          expect([PAGE_4K, PAGE_2M]).toContain(g.pageSize);
          expect(g.size).toBeGreaterThan(0);
          expect(g.base % g.pageSize + (g.size % g.pageSize) + (g.offset % PAGE_4K)).toBe(0);
          expect(g.base + g.size).toBeLessThanOrEqual(Number.MAX_SAFE_INTEGER);
          if (i > 0) expect(sorted[i - 1]!.base + sorted[i - 1]!.size).toBeLessThanOrEqual(g.base);
        });
      }),
      params,
    );
  }, TIMEOUT_MS);

  test("mutated bodies (bytes flipped, inserted, deleted) are refused with a HandshakeError or accepted, nothing else", () => {
    const mutation = fc.tuple(fc.constantFrom("flip", "insert", "delete"), fc.nat(), fc.integer({ min: 0, max: 255 }));
    fc.assert(
      fc.property(body, fc.array(mutation, { minLength: 1, maxLength: 6 }), (regions, muts) => {
        let b = Array.from(new TextEncoder().encode(JSON.stringify(regions)));
        for (const [kind, at, v] of muts) {
          const i = b.length ? at % b.length : 0;
          if (kind === "flip") b[i] = v;
          else if (kind === "insert") b.splice(i, 0, v);
          else b.splice(i, 1);
        }
        const bytes = Uint8Array.from(b.slice(0, MAX_HANDSHAKE_BYTES));
        const scan = scanJson(bytes);
        if (scan.state === "complete") serverParse(bytes, scan.end);
      }),
      params,
    );
  }, TIMEOUT_MS);

  test("an integer is refused by the scanner exactly when it is beyond 2^53 - 1", () => {
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: (1n << 70n) - 1n }), fc.constantFrom("", "0", "00"), (n, pad) => {
        const r = scanJson(new TextEncoder().encode(`[{"x":${pad}${n}}]`));
        expect(r.state).toBe(n > MAX_SAFE ? "invalid" : "complete");
      }),
      params,
    );
  }, TIMEOUT_MS);
});

// ---- mapped-ram ----------------------------------------------------------------------------------

let dir: ReturnType<typeof tempDir>;
let gen: GeneratedMappedRam;
let original: Uint8Array;

beforeAll(() => {
  dir = tempDir("snapload-fuzz-");
  gen = generateMappedRam(join(dir.path, "fuzz.mr"), {
    expect: false,
    seed: 5,
    blocks: [
      { name: "pc.ram", usedLength: 64 * 1024 },
      { name: "pc.bios", usedLength: 8192, fill: "data" },
      { name: "vga.vram", usedLength: 2 * 1024 * 1024, pageSize: 2 * 1024 * 1024 },
    ],
  });
  original = readFileSync(gen.path);
});

afterAll(() => dir?.cleanup());

type Mutation = { kind: "byte"; at: number; v: number } | { kind: "be64"; field: number; v: bigint } | { kind: "truncate"; len: number };

describe("fuzz: mapped-ram parser", () => {
  test("mutated headers, records and bitmaps: parsed with consistent blocks, or refused with an ImageError", () => {
    // Where the parser reads: the stream head, every record and header, every bitmap, the end marker.
    const ranges: [number, number][] = [[0, gen.totalOffset + 8]];
    const fields: number[] = [gen.totalOffset];
    for (const b of gen.blocks) {
      ranges.push([b.recordOffset, b.bitmapOffset + b.bitmap.length]);
      fields.push(b.headerOffset - 8, b.headerOffset + 4, b.headerOffset + 12, b.headerOffset + 20);
    }
    ranges.push([gen.endOfBlocks, gen.endOfBlocks + 16]);
    const size = original.length;
    const interesting = [0n, 1n, 4n, 4096n, 1n << 20n, 1n << 30n, BigInt(size), BigInt(size - 1), BigInt(size + 4096), MAX_SAFE, 1n << 63n, (1n << 64n) - 1n];
    const offsetIn = fc.tuple(fc.nat({ max: ranges.length - 1 }), fc.nat()).map(([r, k]) => {
      const [a, b] = ranges[r]!;
      return a + (k % (b - a));
    });
    const mutation: fc.Arbitrary<Mutation> = fc.oneof(
      fc.record({ kind: fc.constant("byte" as const), at: offsetIn, v: fc.integer({ min: 0, max: 255 }) }),
      fc.record({
        kind: fc.constant("be64" as const),
        field: fc.constantFrom(...fields),
        v: fc.oneof(fc.constantFrom(...interesting), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
      }),
      fc.record({ kind: fc.constant("truncate" as const), len: fc.nat({ max: size }) }),
    );
    const fd = openSync(gen.path, "r+");
    try {
      fc.assert(
        fc.property(fc.array(mutation, { minLength: 1, maxLength: 4 }), (muts) => {
          let truncated = false;
          const touched: [number, number][] = [];
          for (const m of muts) {
            if (m.kind === "truncate") {
              ftruncateSync(fd, m.len);
              truncated = true;
            } else if (m.kind === "byte") {
              writeSync(fd, Uint8Array.of(m.v), 0, 1, m.at);
              touched.push([m.at, 1]);
            } else {
              const b = new Uint8Array(8);
              new DataView(b.buffer).setBigUint64(0, m.v, false);
              writeSync(fd, b, 0, 8, m.field);
              touched.push([m.field, 8]);
            }
          }
          try {
            checkMappedRam(gen.path);
          } finally {
            if (truncated) {
              ftruncateSync(fd, 0);
              writeSync(fd, original, 0, original.length, 0);
            } else for (const [at, n] of touched) writeSync(fd, original, at, n, at);
          }
        }),
        params,
      );
    } finally {
      closeSync(fd);
    }
  }, TIMEOUT_MS);
});

function checkMappedRam(path: string): void {
  let file: ReturnType<typeof parseMappedRam>;
  try {
    file = parseMappedRam(path);
  } catch (e) {
    expectTyped(e, SnaploadError);
    expect((e as SnaploadError).code).toBe("BAD_IMAGE");
    return;
  }
  expect(file.blocks.length).toBeGreaterThan(0);
  let sum = 0;
  for (const b of file.blocks) {
    sum += b.usedLength;
    expect(b.usedLength % b.pageSize).toBe(0);
    expect(b.pageSize % IMAGE_PAGE).toBe(0);
    expect(b.bitmapOffset + Math.ceil(b.pages / 8)).toBeLessThanOrEqual(file.fileSize);
    expect(b.pagesOffset).toBeLessThanOrEqual(file.fileSize);
    expect(b.dataPages + b.zeroPages).toBe(b.pages);
    expect(b.dataPages === 0 || b.pagesOffset + b.pageSize <= file.fileSize).toBe(true);
  }
  expect(sum).toBe(file.totalRam);
  for (const b of file.blocks) {
    const image = openMappedRamImage(path, b.name);
    try {
      expect(image.size).toBe(b.usedLength);
      expect(image.zero.pages).toBe(b.usedLength / IMAGE_PAGE);
      expect(image.dataPages).toBe(b.dataPages * (b.pageSize / IMAGE_PAGE));
    } finally {
      image.close();
    }
  }
}

// ---- working-set files -----------------------------------------------------------------------------

describe("fuzz: working-set files", () => {
  const imageSize = fc.integer({ min: 1, max: 1 << 30 });

  test("any order of in-range pages round-trips", () => {
    fc.assert(
      fc.property(
        imageSize.chain((size) => fc.tuple(fc.constant(size), fc.array(fc.nat({ max: Math.ceil(size / IMAGE_PAGE) - 1 }), { maxLength: 300 }))),
        ([size, pages]) => {
          const order = Uint32Array.from(pages);
          expect(decodeWorkingSet(encodeWorkingSet(order, size), size)).toEqual(order);
        },
      ),
      params,
    );
  }, TIMEOUT_MS);

  test("mutated files (with or without a fixed-up checksum) decode to in-range pages or a WorkingSetError", () => {
    const mutation = fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }));
    fc.assert(
      fc.property(
        fc.array(fc.nat({ max: 4095 }), { maxLength: 64 }),
        fc.array(mutation, { minLength: 1, maxLength: 6 }),
        fc.boolean(),
        fc.integer({ min: -8, max: 8 }),
        (pages, muts, fixCrc, resize) => {
          const size = 4096 * IMAGE_PAGE;
          const enc = encodeWorkingSet(Uint32Array.from(pages), size);
          const b = new Uint8Array(Math.max(0, enc.length + resize));
          b.set(enc.subarray(0, b.length));
          for (const [at, v] of muts) if (b.length) b[at % b.length] = v;
          if (fixCrc && b.length >= 4) new DataView(b.buffer).setUint32(b.length - 4, Bun.hash.crc32(b.subarray(0, b.length - 4)), true);
          try {
            const order = decodeWorkingSet(b, size);
            for (const p of order) expect(p).toBeLessThan(4096);
          } catch (e) {
            expectTyped(e, WorkingSetError);
          }
        },
      ),
      params,
    );
  }, TIMEOUT_MS);

  test("arbitrary bytes are refused with a WorkingSetError", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), fc.integer({ min: 1, max: 2 ** 40 }), (b, size) => {
        try {
          decodeWorkingSet(b, size);
        } catch (e) {
          expectTyped(e, WorkingSetError);
        }
      }),
      params,
    );
  }, TIMEOUT_MS);
});
