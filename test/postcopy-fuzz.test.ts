// Property-based tests (fast-check) over every postcopy frame type's decoder and check: whatever
// the bytes, a decoder returns something that satisfies the protocol's invariants or throws a
// ProtocolError (a refused frame), never anything else; valid frames round-trip; sealed frames
// open only unchanged, in order, under their key.
// Seeded and bounded here; `npm run fuzz:postcopy` runs the same properties much longer
// (FUZZ_RUNS, FUZZ_SEED pick the run count and seed).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import fc from "fast-check";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { readTokenFile } from "../src/postcopy/auth.ts";
import {
  checkDataChunk, decodeChallenge, decodeErrorText, decodeHeader, decodeHello, decodeInfo, decodeWelcome, encodeChallenge, encodeHeader, encodeHello,
  encodeInfo, encodeWelcome, FrameHeader, FrameType, frame, HEADER_SIZE, MAX_PAYLOAD, MAX_REQUEST, ProtocolError, requestInBounds, Role,
  WIRE_PAGE, zeroMapBytes, zeroMapFromBytes,
} from "../src/postcopy/protocol.ts";
import { ReceiveSeal, SEALED_HEADER_SIZE, SealError, SendSeal } from "../src/postcopy/seal.ts";
import { ensureBuilt, tempDir } from "./harness.ts";
import { type PageServerProc, RawClient, startPageServer } from "./postcopy-wire.ts";

const RUNS = Number(process.env.FUZZ_RUNS ?? 300);
const SEED = Number(process.env.FUZZ_SEED ?? 20261202);
const params = { numRuns: RUNS, seed: SEED };
const timeout = Math.max(5000, RUNS * 5);

/** Runs `f`; a ProtocolError is a refusal (fine); anything else is a bug. Returns the result or undefined. */
function refusedOr<T>(f: () => T): T | undefined {
  try {
    return f();
  } catch (e) {
    if (e instanceof ProtocolError) return undefined;
    throw e;
  }
}

const bytes = (max: number) => fc.uint8Array({ minLength: 0, maxLength: max });
/** Mostly-valid encodings with a few bytes changed: reaches past the first check of each decoder. */
const mutated = (valid: fc.Arbitrary<Uint8Array>) =>
  fc.tuple(valid, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 4 })).map(([b, edits]) => {
    const out = b.slice();
    for (const [at, x] of edits) if (out.length > 0) out[at % out.length]! ^= x;
    return out;
  });
const u53 = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });

describe("postcopy frame decoders (fast-check)", () => {
  const headerOf = fc.record({
    type: fc.constantFrom(...Object.values(FrameType)),
    id: u53,
    offset: u53,
    arg: fc.nat({ max: 0xffff_ffff }),
  });
  const validHeader = headerOf.chain((h) =>
    fc.nat({ max: MAX_PAYLOAD[h.type]! }).map((length) => {
      const b = new Uint8Array(HEADER_SIZE);
      encodeHeader(new DataView(b.buffer), 0, h.type, length, h.id, h.offset, h.arg);
      return b;
    }),
  );

  test("header: any 32 bytes decode to a frame within its type's limits, or are refused; valid headers round-trip", () => {
    fc.assert(
      fc.property(fc.oneof(fc.uint8Array({ minLength: HEADER_SIZE, maxLength: HEADER_SIZE }), mutated(validHeader)), (b) => {
        const h = refusedOr(() => decodeHeader(new DataView(b.buffer, b.byteOffset, HEADER_SIZE), 0, new FrameHeader()));
        if (h === undefined) return;
        expect(MAX_PAYLOAD[h.type]).toBeDefined();
        expect(h.length).toBeLessThanOrEqual(MAX_PAYLOAD[h.type]!);
        expect(h.id).toBeLessThanOrEqual(Number.MAX_SAFE_INTEGER);
        expect(h.offset).toBeLessThanOrEqual(Number.MAX_SAFE_INTEGER);
        const again = new Uint8Array(HEADER_SIZE);
        encodeHeader(new DataView(again.buffer), 0, h.type as FrameType, h.length, h.id, h.offset, h.arg);
        expect([...again]).toEqual([...b]);
      }),
      params,
    );
  }, timeout);

  const hello = fc.record({
    versionMin: fc.nat({ max: 0xffff }),
    versionMax: fc.nat({ max: 0xffff }),
    role: fc.constantFrom(Role.PROBE, Role.URGENT, Role.BACKGROUND),
    flags: fc.constantFrom(0, 1),
    nonce: fc.uint8Array({ minLength: 32, maxLength: 32 }),
  });

  test("HELLO: refused or well-formed; valid ones round-trip", () => {
    fc.assert(
      fc.property(hello, (h) => {
        const d = decodeHello(encodeHello(h));
        expect({ ...d, nonce: [...d.nonce] }).toEqual({ ...h, nonce: [...h.nonce] });
      }),
      params,
    );
    fc.assert(
      fc.property(fc.oneof(bytes(100), mutated(hello.map(encodeHello))), (b) => {
        const d = refusedOr(() => decodeHello(b));
        if (d === undefined) return;
        expect(b.length).toBe(48);
        expect(d.role).toBeLessThanOrEqual(Role.BACKGROUND);
        expect(d.flags & ~1).toBe(0);
        expect(d.nonce.length).toBe(32);
      }),
      params,
    );
  }, timeout);

  test("CHALLENGE and WELCOME: refused or well-formed; valid ones round-trip", () => {
    const challenge = fc.tuple(fc.nat({ max: 0xffff }), fc.uint8Array({ minLength: 32, maxLength: 32 }));
    fc.assert(
      fc.property(challenge, ([v, n]) => {
        const d = decodeChallenge(encodeChallenge(v, n));
        expect([d.version, ...d.nonce]).toEqual([v, ...n]);
      }),
      params,
    );
    fc.assert(
      fc.property(fc.oneof(bytes(100), mutated(challenge.map(([v, n]) => encodeChallenge(v, n)))), (b) => {
        const d = refusedOr(() => decodeChallenge(b));
        if (d !== undefined) expect(d.nonce.length).toBe(32);
      }),
      params,
    );
    fc.assert(
      fc.property(bytes(100), (b) => {
        const p = refusedOr(() => decodeWelcome(b));
        if (p !== undefined) expect([...encodeWelcome(p)]).toEqual([...b]);
      }),
      params,
    );
  }, timeout);

  const info = fc.integer({ min: 1, max: 2 ** 44 }).chain((size) => {
    const pages = Math.ceil(size / WIRE_PAGE);
    return fc.record({ size: fc.constant(size), pages: fc.constant(pages), dataPages: fc.nat({ max: pages }), id: fc.uint8Array({ minLength: 16, maxLength: 16 }) });
  });

  test("INFO: refused or a consistent image description; valid ones round-trip", () => {
    fc.assert(
      fc.property(info, (i) => {
        const d = decodeInfo(encodeInfo(i)).info;
        expect({ ...d, id: [...d.id] }).toEqual({ ...i, id: [...i.id] });
      }),
      params,
    );
    fc.assert(
      fc.property(fc.oneof(bytes(80), mutated(info.map(encodeInfo))), (b) => {
        const d = refusedOr(() => decodeInfo(b));
        if (d === undefined) return;
        expect(d.info.size).toBeGreaterThan(0);
        expect(d.info.pages).toBe(Math.ceil(d.info.size / WIRE_PAGE));
        expect(d.info.dataPages).toBeLessThanOrEqual(d.info.pages);
        expect(d.maxRequest).toBeGreaterThanOrEqual(2 * 1024 * 1024);
      }),
      params,
    );
  }, timeout);

  test("ZERO_MAP: refused or a map whose bits round-trip exactly", () => {
    let accepted = 0;
    const sized = fc.nat({ max: 5000 }).chain((pages) =>
      fc.tuple(fc.constant(pages), fc.oneof(fc.uint8Array({ minLength: Math.ceil(pages / 8), maxLength: Math.ceil(pages / 8) }), fc.uint8Array({ maxLength: 700 }))),
    );
    fc.assert(
      fc.property(sized, ([pages, bits]) => {
        const z = refusedOr(() => zeroMapFromBytes(bits, pages));
        if (z === undefined) return;
        accepted++;
        expect(bits.length).toBe(Math.ceil(pages / 8));
        expect([...zeroMapBytes(z)]).toEqual([...bits]);
      }),
      params,
    );
    expect(accepted).toBeGreaterThan(0);
  }, timeout);

  test("ERROR: any text decodes, without control characters", () => {
    fc.assert(
      fc.property(bytes(1024), (b) => {
        expect(decodeErrorText(b)).not.toMatch(/[\x00-\x1f\x7f]/);
      }),
      params,
    );
  }, timeout);

  test("REQUEST: refused unless whole pages of 4 KiB to 4 MiB; in bounds exactly when inside the image", () => {
    fc.assert(
      fc.property(u53, fc.nat({ max: 0xffff_ffff }), fc.integer({ min: 1, max: 2 ** 40 }), (offset, size, imageSize) => {
        const r = refusedOr(() => requestInBounds(7, offset, size, imageSize));
        const wellFormed = size > 0 && size <= MAX_REQUEST && size % WIRE_PAGE === 0 && offset % WIRE_PAGE === 0;
        if (!wellFormed) return void expect(r).toBeUndefined();
        expect(r).toBe(offset + size <= imageSize);
      }),
      params,
    );
  }, timeout);

  test("DATA: a chunk is accepted only in whole pages, in order, inside its request, carrying data pages and skipping zero ones", () => {
    const PAGES = 64;
    let accepted = 0;
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: PAGES / 8, maxLength: PAGES / 8 }),
        fc.nat({ max: PAGES - 1 }),
        fc.nat({ max: PAGES }),
        fc.nat({ max: PAGES * WIRE_PAGE }),
        fc.oneof(fc.nat({ max: PAGES * WIRE_PAGE }), fc.nat({ max: PAGES }).map((p) => p * WIRE_PAGE)),
        fc.oneof(fc.nat({ max: PAGES * WIRE_PAGE }), fc.nat({ max: 8 }).map((p) => p * WIRE_PAGE)),
        (bits, first, count, cursor, off, len) => {
          const zero = zeroMapFromBytes(bits, PAGES);
          const reqPages = Math.max(1, Math.min(count, PAGES - first));
          const start = first * WIRE_PAGE;
          const reqBytes = reqPages * WIRE_PAGE;
          const cur = Math.min(cursor - (cursor % WIRE_PAGE), reqBytes);
          // The chunk a correct server sends next (the next data run after the cursor) is accepted.
          let p = (start + cur) / WIRE_PAGE;
          const end = first + reqPages;
          while (p < end && zero.isZero(p)) p++;
          if (p < end) {
            let e = p;
            while (e < end && !zero.isZero(e)) e++;
            checkDataChunk(1, p * WIRE_PAGE - start, (e - p) * WIRE_PAGE, cur, start, reqBytes, zero);
            accepted++;
          }
          // Any other chunk only when it keeps every rule.
          const ok = refusedOr(() => (checkDataChunk(1, off, len, cur, start, reqBytes, zero), true)) === true;
          if (!ok) return;
          expect(len).toBeGreaterThan(0);
          expect(off % WIRE_PAGE + (len % WIRE_PAGE)).toBe(0);
          expect(off).toBeGreaterThanOrEqual(cur);
          expect(off + len).toBeLessThanOrEqual(reqBytes);
          for (let p = (start + cur) / WIRE_PAGE; p < (start + off) / WIRE_PAGE; p++) expect(zero.isZero(p)).toBe(true);
          for (let p = (start + off) / WIRE_PAGE; p < (start + off + len) / WIRE_PAGE; p++) expect(zero.isZero(p)).toBe(false);
        },
      ),
      params,
    );
    expect(accepted).toBeGreaterThan(0);
  }, timeout);

  test("PING, PONG and every other frame: a sealed frame opens only unchanged, in order, under its key", () => {
    const key = new Uint8Array(32).fill(7);
    const anyFrame = fc.tuple(fc.constantFrom(...Object.values(FrameType)), u53, fc.uint8Array({ maxLength: 300 })).map(([type, id, p]) =>
      frame(type, p.length > 0 ? p : null, id),
    );
    fc.assert(
      fc.property(fc.array(anyFrame, { minLength: 1, maxLength: 4 }), fc.nat(), fc.integer({ min: 1, max: 255 }), (frames, at, x) => {
        const tx = new SendSeal(key);
        const wire = frames.map((f) => tx.frame(f));
        tx.free();
        const openAll = (list: Uint8Array[]) => {
          const rx = new ReceiveSeal(key);
          try {
            return list.map((f) => {
              const hdr = f.slice(0, SEALED_HEADER_SIZE);
              rx.openHeader(hdr);
              const payload = f.slice(SEALED_HEADER_SIZE);
              if (payload.length > 0) rx.openPayload(payload, payload.length);
              rx.next();
              return [...hdr.subarray(0, HEADER_SIZE), ...payload];
            });
          } finally {
            rx.free();
          }
        };
        expect(openAll(wire)).toEqual(frames.map((f) => [...f]));
        const changed = wire.map((f) => f.slice());
        const victim = changed[at % changed.length]!;
        victim[Math.floor(at / changed.length) % victim.length]! ^= x;
        expect(() => openAll(changed)).toThrow(SealError);
        if (wire.length > 1) expect(() => openAll(wire.slice(1))).toThrow(SealError);
      }),
      { ...params, numRuns: Math.max(20, Math.floor(RUNS / 3)) },
    );
  }, timeout);
});

describe("a real page server fed arbitrary authenticated frames (fast-check)", () => {
  let dir: ReturnType<typeof tempDir>;
  let ps: PageServerProc;
  let token: Buffer;
  let image: Uint8Array;
  beforeAll(async () => {
    ensureBuilt();
    dir = tempDir("snapload-pcfuzz-");
    const path = join(dir.path, "vm.mem");
    writeDemoImage(path, 4 * 1024 * 1024, 9);
    image = new Uint8Array(readFileSync(path));
    writeFileSync(join(dir.path, "token"), "fuzzing-the-page-server-token\n", { mode: 0o600 });
    token = readTokenFile(join(dir.path, "token"));
    ps = await startPageServer(["--mem", path, "--token-file", join(dir.path, "token")]);
  }, 30_000);
  afterAll(async () => {
    await ps?.daemon.stop();
    dir?.cleanup();
  });

  test("whatever frames an authenticated client sends, the server answers or closes that connection, and serves the next client right", async () => {
    // Mostly what an authenticated client may send (REQUEST, PING: no payload), sometimes anything.
    const anyFrame = fc.tuple(
      fc.oneof({ arbitrary: fc.constantFrom(FrameType.REQUEST, FrameType.PING), weight: 6 }, { arbitrary: fc.integer({ min: 1, max: 12 }), weight: 1 }),
      fc.oneof(fc.nat({ max: 10 }), u53),
      fc.oneof({ arbitrary: fc.nat({ max: 64 }).map((p) => p * WIRE_PAGE), weight: 4 }, { arbitrary: u53, weight: 1 }),
      fc.oneof({ arbitrary: fc.integer({ min: 1, max: 64 }).map((p) => p * WIRE_PAGE), weight: 4 }, { arbitrary: fc.nat({ max: 0xffff_ffff }), weight: 1 }),
      fc.oneof({ arbitrary: fc.constant(new Uint8Array(0)), weight: 6 }, { arbitrary: fc.uint8Array({ maxLength: 64 }), weight: 1 }),
    ).map(([type, id, offset, arg, p]) => {
      const f = frame(FrameType.PING, p.length > 0 ? p : null, id, offset, arg);
      f[0] = type; // any type, known or not, allowed here or not
      return f;
    });
    const outcomes = { survived: 0, closed: 0 };
    await fc.assert(
      fc.asyncProperty(fc.array(anyFrame, { minLength: 1, maxLength: 4 }), async (frames) => {
        const c = await RawClient.connect(ps.port);
        try {
          expect((await c.authenticate(token, Role.URGENT)).type).toBe(FrameType.WELCOME);
          await c.next((f) => f.type === FrameType.INFO);
          for (const f of frames) c.send(f);
          c.send(frame(FrameType.PING, null, 424242));
          // Either the connection survived everything (then our PING is answered) or it was refused
          // and closed (its ERROR may be lost to the reset our later frames cause: TCP drops unread data).
          const end = await c.next((f) => f.type === FrameType.PONG && f.id === 424242, 5000).catch(() => undefined);
          if (end === undefined) {
            expect(c.closed).toBe(true);
            outcomes.closed++;
          } else {
            outcomes.survived++;
          }
          expect(c.error).toBeUndefined(); // everything the server sent opened
        } finally {
          c.close();
        }
      }),
      { ...params, numRuns: Math.max(10, Math.floor(RUNS / 10)) },
    );
    // The generator reaches both: frames the server takes (REQUEST, PING) and frames it refuses.
    expect(outcomes.survived).toBeGreaterThan(0);
    expect(outcomes.closed).toBeGreaterThan(0);
    expect(ps.daemon.proc.exitCode).toBeNull();
    const c = await RawClient.connect(ps.port);
    await c.authenticate(token, Role.URGENT);
    c.send(frame(FrameType.REQUEST, null, 1, 0, 16 * WIRE_PAGE));
    const d = await c.next((f) => f.type === FrameType.DATA);
    expect(Buffer.from(d.payload).equals(Buffer.from(image.subarray(d.offset, d.offset + d.payload.length)))).toBe(true);
    c.close();
  }, Math.max(30_000, RUNS * 50));
});
