// The postcopy wire protocol: encoding, limits, authentication, and a real page server fed
// malformed, oversized, unauthenticated and out-of-bounds frames by a hand-driven client.
// Every bad connection must end with one clear ERROR frame and log line, and nothing else may notice.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { ZeroMap } from "../src/sources/image/snapshot-image.ts";
import { parseHostPort, parseTcpUrl } from "../src/postcopy/address.ts";
import { prng } from "../src/core/prng.ts";
import { clientProof, proofsEqual, readTokenFile, serverProof, sessionKeys } from "../src/postcopy/auth.ts";
import {
  decodeHeader, decodeHello, decodeInfo, decodeWelcome, encodeHeader, encodeHello, encodeInfo, encodeWelcome, ErrorCode, FrameHeader, FrameType, frame, HEADER_SIZE,
  MAX_CHUNK, PROTOCOL_VERSION, ProtocolError, Role, WANT_ZERO_MAP, zeroMapBytes, zeroMapFromBytes,
} from "../src/postcopy/protocol.ts";
import { ensureBuilt, runSnapload, STANDIN, startDaemon, tempDir } from "./harness.ts";
import { fakeServer, misbehavingPageServer, type PageServerProc, RawClient, type RawFrame, startPageServer } from "./postcopy-wire.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;
const IMAGE_BYTES = 8 * MIB;

let dir: ReturnType<typeof tempDir>;
let image: string;
let tokenFile: string;
let token: Buffer;
let ps: PageServerProc;
let imageBytes: Buffer;

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir("snapload-pcproto-");
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, IMAGE_BYTES, 5);
  imageBytes = readFileSync(image);
  tokenFile = join(dir.path, "token");
  writeFileSync(tokenFile, "correct horse battery staple\n", { mode: 0o600 });
  token = readTokenFile(tokenFile);
  ps = await startPageServer(["--mem", image, "--token-file", tokenFile, "--handshake-timeout", "700", "--log-format", "json"]);
});

afterAll(async () => {
  await ps?.daemon.stop();
  dir?.cleanup();
});

function header(type: number, length: number, id = 0, offset = 0, arg = 0): Uint8Array {
  const b = new Uint8Array(HEADER_SIZE);
  encodeHeader(new DataView(b.buffer), 0, type as FrameType, length, id, offset, arg);
  return b;
}

describe("frames", () => {
  test("a header round-trips", () => {
    const b = header(FrameType.REQUEST, 0, 2 ** 40 + 7, 3 * 2 ** 32 + 4096, 8192);
    const h = decodeHeader(new DataView(b.buffer), 0, new FrameHeader());
    expect([h.type, h.length, h.id, h.offset, h.arg]).toEqual([FrameType.REQUEST, 0, 2 ** 40 + 7, 3 * 2 ** 32 + 4096, 8192]);
  });

  const bad: [string, (b: Uint8Array, v: DataView) => void, RegExp][] = [
    ["unknown type", (b) => (b[0] = 99), /unknown frame type 99/],
    ["reserved bits", (b) => (b[1] = 1), /reserved header bits/],
    ["oversized DATA", (_, v) => v.setUint32(4, MAX_CHUNK + 1, true), /DATA frame of 131073 bytes \(at most 131072\)/],
    ["REQUEST with a payload", (b, v) => ((b[0] = FrameType.REQUEST), v.setUint32(4, 1, true)), /REQUEST frame of 1 bytes \(at most 0\)/],
    ["id beyond 2^53", (_, v) => v.setUint32(12, 0x0020_0000, true), /beyond 2\^53/],
  ];
  for (const [name, mutate, pattern] of bad) {
    test(`refused: ${name}`, () => {
      const b = header(FrameType.DATA, 4096, 1);
      const v = new DataView(b.buffer);
      mutate(b, v);
      expect(() => decodeHeader(v, 0, new FrameHeader())).toThrow(pattern);
      try {
        decodeHeader(v, 0, new FrameHeader());
      } catch (e) {
        expect(e).toBeInstanceOf(ProtocolError);
        expect((e as ProtocolError).code).toBe("BAD_FRAME");
      }
    });
  }

  test("hello and welcome round-trip; a foreign magic is refused", () => {
    const nonce = new Uint8Array(32).fill(7);
    const h = decodeHello(encodeHello({ versionMin: 1, versionMax: 3, role: Role.BACKGROUND, flags: WANT_ZERO_MAP, nonce }));
    expect([h.versionMin, h.versionMax, h.role, h.flags]).toEqual([1, 3, Role.BACKGROUND, WANT_ZERO_MAP]);
    expect([...h.nonce]).toEqual([...nonce]);
    const bad = encodeHello({ versionMin: 1, versionMax: 1, role: Role.URGENT, flags: 0, nonce });
    bad[0] = 0x47; // "GET " would start like this
    expect(() => decodeHello(bad)).toThrow(/SLPC magic/);
    expect([...decodeWelcome(encodeWelcome(new Uint8Array(32).fill(1)))]).toEqual(Array(32).fill(1));
    const w = decodeInfo(encodeInfo({ size: 5 * PAGE + 1, pages: 6, dataPages: 2, id: new Uint8Array(16).fill(9) }));
    expect([w.info.size, w.info.pages, w.info.dataPages]).toEqual([5 * PAGE + 1, 6, 2]);
    expect(() => decodeInfo(encodeInfo({ size: 8 * PAGE, pages: 3, dataPages: 0, id: new Uint8Array(16) }))).toThrow(/3 pages/);
  });

  test("the zero map round-trips bit for bit; stray bits past the end are refused", () => {
    const pages = 1000;
    const z = new ZeroMap(pages);
    const rnd = prng(12345);
    for (let p = 0; p < pages; p++) if (rnd() < 1 / 3) z.setZero(p);
    z.setZeroRange(100, 300);
    const bits = zeroMapBytes(z);
    expect(bits.length).toBe(125);
    const back = zeroMapFromBytes(bits, pages);
    for (let p = 0; p < pages; p++) expect(back.isZero(p)).toBe(z.isZero(p));
    const odd = zeroMapBytes(new ZeroMap(13));
    odd[1]! |= 0x80; // bit 15: page 15 of 13
    expect(() => zeroMapFromBytes(odd, 13)).toThrow(/past the last page/);
  });
});

describe("tokens and proofs", () => {
  test("proofs differ per direction and per token; the token never appears in them", () => {
    const t = { hello: encodeHello({ versionMin: 2, versionMax: 2, role: Role.URGENT, flags: 0, nonce: new Uint8Array(32).fill(1) }), challenge: new Uint8Array(48).fill(2) };
    const c = clientProof(token, t);
    const s = serverProof(token, t);
    expect(proofsEqual(c, s)).toBe(false);
    expect(proofsEqual(c, clientProof(Buffer.from("another token, also long"), t))).toBe(false);
    expect(proofsEqual(c, clientProof(token, t))).toBe(true);
    expect(Buffer.from(c).includes(token)).toBe(false);
    // The proof covers the whole transcript: a relay that changes the role (or anything else) breaks it.
    const other = { ...t, hello: encodeHello({ versionMin: 2, versionMax: 2, role: Role.BACKGROUND, flags: 0, nonce: new Uint8Array(32).fill(1) }) };
    expect(proofsEqual(c, clientProof(token, other))).toBe(false);
  });

  test("session keys differ per direction, per connection (nonce) and per token", () => {
    const t = { hello: new Uint8Array(48).fill(1), challenge: new Uint8Array(48).fill(2) };
    const k = sessionKeys(token, t);
    const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
    const again = sessionKeys(token, { ...t, challenge: new Uint8Array(48).fill(3) });
    const otherToken = sessionKeys(Buffer.from("another token, also long"), t);
    const all = [k.clientToServer, k.serverToClient, again.clientToServer, again.serverToClient, otherToken.clientToServer, otherToken.serverToClient].map(hex);
    expect(new Set(all).size).toBe(6);
    expect(hex(sessionKeys(token, t).clientToServer)).toBe(all[0]!);
  });

  test("short, missing or empty token files are refused with the path", () => {
    const short = join(dir.path, "short");
    writeFileSync(short, "tiny\n");
    expect(() => readTokenFile(short)).toThrow(/4 bytes; use at least 16/);
    expect(() => readTokenFile(join(dir.path, "nope"))).toThrow(/nope: cannot read it \(ENOENT\)/);
  });

  test("addresses", () => {
    expect(parseHostPort("10.0.0.1:7000", "--listen")).toEqual({ host: "10.0.0.1", port: 7000 });
    expect(parseHostPort("[::1]:80", "--listen")).toEqual({ host: "::1", port: 80 });
    expect(parseHostPort("0.0.0.0:0", "--listen", true)).toEqual({ host: "0.0.0.0", port: 0 });
    expect(() => parseHostPort("10.0.0.1", "--listen")).toThrow(/expected HOST:PORT/);
    expect(() => parseHostPort("10.0.0.1:70000", "--listen")).toThrow(/out of range/);
    expect(() => parseTcpUrl("tcp://host:0")).toThrow(/out of range/);
    expect(parseTcpUrl("tcp://pages.internal:9000")).toEqual({ host: "pages.internal", port: 9000 });
  });
});

describe("the page server refuses bad peers, one connection at a time", () => {
  /** An authenticated connection kept open across the bad ones: it must keep working. */
  let witness: RawClient;
  beforeAll(async () => {
    witness = await RawClient.connect(ps.port);
    expect((await witness.authenticate(token, Role.URGENT)).type).toBe(FrameType.WELCOME);
  });
  afterAll(() => witness?.close());

  /** `send` may return the ERROR frame itself when it had to read it (a refused handshake). */
  async function expectRefused(send: (c: RawClient) => void | Promise<void | RawFrame>, code: ErrorCode, text: RegExp): Promise<void> {
    const refusals = () => ps.daemon.events().filter((e) => e.event === "page_server.client_refused");
    const before = refusals().length;
    const c = await RawClient.connect(ps.port);
    const early = await send(c);
    const e = early ?? (await c.next((f) => f.type === FrameType.ERROR));
    expect(e.type).toBe(FrameType.ERROR);
    expect(e.arg).toBe(code);
    expect(e.payload.toString()).toMatch(text);
    expect(await c.waitClosed()).toBe(true);
    // One event for it, saying what the client was told.
    const logged = (await ps.daemon.waitForEvents("page_server.client_refused", before + 1)).slice(before);
    expect(logged.length).toBe(1);
    expect(logged[0]).toMatchObject({ code, reason: e.payload.toString(), peer: "127.0.0.1" });
  }

  test("a HELLO with a foreign magic", async () => {
    const hello = encodeHello({ versionMin: 1, versionMax: 1, role: Role.URGENT, flags: 0, nonce: new Uint8Array(32) });
    hello.set(new TextEncoder().encode("GET "), 0);
    await expectRefused((c) => c.send(frame(FrameType.HELLO, hello)), ErrorCode.BAD_FRAME, /SLPC magic/);
  });

  test("an HTTP request instead of a HELLO", async () => {
    await expectRefused((c) => c.send(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: pages.internal\r\nAccept: */*\r\n\r\n")), ErrorCode.BAD_FRAME, /unknown frame type 71/);
  });

  test("a protocol version the server does not speak", async () => {
    const hello = encodeHello({ versionMin: PROTOCOL_VERSION + 1, versionMax: PROTOCOL_VERSION + 5, role: Role.URGENT, flags: 0, nonce: new Uint8Array(32) });
    await expectRefused((c) => c.send(frame(FrameType.HELLO, hello)), ErrorCode.VERSION, /versions 3-7; this server speaks 2/);
  });

  test("an oversized frame (a 1 MiB HELLO)", async () => {
    await expectRefused((c) => c.send(header(FrameType.HELLO, MIB)), ErrorCode.BAD_FRAME, /HELLO frame of 1048576 bytes \(at most 48\)/);
  });

  test("a REQUEST before authenticating", async () => {
    await expectRefused((c) => c.send(header(FrameType.REQUEST, 0, 1, 0, PAGE)), ErrorCode.BAD_FRAME, /unexpected REQUEST frame before HELLO/);
  });

  test("a wrong token", async () => {
    await expectRefused(
      (c) => c.authenticate(Buffer.from("not the token at all, sorry"), Role.URGENT),
      ErrorCode.AUTH_FAILED,
      /authentication failed: the client's proof does not match our token/,
    );
  });

  test("a client that never authenticates is dropped after --handshake-timeout", async () => {
    const c = await RawClient.connect(ps.port);
    const e = await c.next((f) => f.type === FrameType.ERROR, 3000);
    expect(e.arg).toBe(ErrorCode.TIMEOUT);
    expect(await c.waitClosed()).toBe(true);
  });

  test("a misaligned REQUEST closes that connection", async () => {
    await expectRefused(
      async (c) => {
        expect((await c.authenticate(token, Role.BACKGROUND)).type).toBe(FrameType.WELCOME);
        c.send(header(FrameType.REQUEST, 0, 5, 100, PAGE));
      },
      ErrorCode.BAD_FRAME,
      /REQUEST 5 for 4096 bytes at 100.*whole 4 KiB pages/,
    );
  });

  test("an out-of-bounds REQUEST is refused by id; the connection goes on", async () => {
    const c = await RawClient.connect(ps.port);
    expect((await c.authenticate(token, Role.URGENT)).type).toBe(FrameType.WELCOME);
    c.send(header(FrameType.REQUEST, 0, 41, IMAGE_BYTES - PAGE, 2 * PAGE)); // straddles the end
    c.send(header(FrameType.REQUEST, 0, 42, 2 ** 50, PAGE)); // far beyond
    const e1 = await c.next((f) => f.type === FrameType.ERROR && f.id === 41);
    const e2 = await c.next((f) => f.type === FrameType.ERROR && f.id === 42);
    expect(e1.arg).toBe(ErrorCode.OUT_OF_BOUNDS);
    expect(e2.payload.toString()).toMatch(/outside the 8388608-byte image/);
    for (const [request, start, size] of [[41, IMAGE_BYTES - PAGE, 2 * PAGE], [42, 2 ** 50, PAGE]]) {
      expect(await ps.daemon.waitForEvent("page_server.request_refused", (e) => e.request === request)).toMatchObject({ start, size, imageSize: IMAGE_BYTES });
    }
    // Still usable:
    c.send(header(FrameType.REQUEST, 0, 43, 0, 64 * PAGE));
    const d = await c.next((f) => f.type === FrameType.DATA && f.id === 43);
    expect(d.payload.length).toBeGreaterThan(0);
    c.close();
  });

  test("replies carry only data pages, in order, sealed; zero pages never cross the wire", async () => {
    const start = 64 * PAGE;
    const bytes = 512 * PAGE; // 2 MiB: several chunks
    witness.send(header(FrameType.REQUEST, 0, 7, start, bytes));
    let got = 0;
    let cursor = 0;
    let zero = 0;
    for (let p = 0; p < bytes / PAGE; p++) if (imageBytes.subarray(start + p * PAGE, start + (p + 1) * PAGE).every((x) => x === 0)) zero++;
    expect(zero).toBeGreaterThan(50);
    while (got < bytes - zero * PAGE) {
      const d = await witness.next((f) => f.type === FrameType.DATA && f.id === 7);
      expect(d.offset).toBeGreaterThanOrEqual(cursor);
      expect(d.payload.length).toBeLessThanOrEqual(MAX_CHUNK);
      expect(d.payload.equals(imageBytes.subarray(start + d.offset, start + d.offset + d.payload.length))).toBe(true);
      // The pages it skipped are zero pages.
      for (let o = cursor; o < d.offset; o += PAGE) expect(imageBytes.subarray(start + o, start + o + PAGE).every((x) => x === 0)).toBe(true);
      cursor = d.offset + d.payload.length;
      got += d.payload.length;
    }
    expect(got).toBe(bytes - zero * PAGE);
  });

  test("the zero map comes on request, and matches the file", async () => {
    const c = await RawClient.connect(ps.port);
    const w = await c.authenticate(token, Role.PROBE, WANT_ZERO_MAP);
    expect(w.type).toBe(FrameType.WELCOME);
    expect(proofsEqual(decodeWelcome(w.payload), w.expectedProof!)).toBe(true);
    const info = decodeInfo((await c.next((f) => f.type === FrameType.INFO)).payload);
    const zf = await c.next((f) => f.type === FrameType.ZERO_MAP);
    const z = zeroMapFromBytes(zf.payload, info.info.pages);
    for (let p = 0; p < info.info.pages; p += 17) {
      const isZero = imageBytes.subarray(p * PAGE, (p + 1) * PAGE).every((x) => x === 0);
      // Holes are zero pages; a written page of zeros may count as data (never the other way round).
      if (z.isZero(p)) expect(isZero).toBe(true);
    }
    c.close();
  });

  test("after all that, the witness connection still answers", async () => {
    witness.send(header(FrameType.PING, 0, 99));
    const pong = await witness.next((f) => f.type === FrameType.PONG);
    expect(pong.id).toBe(99);
  });
});

describe("the client refuses bad page servers with a clear error", () => {
  async function serveAgainst(onConnect: Parameters<typeof fakeServer>[0]): Promise<{ code: number; stderr: string }> {
    const { server, port } = await fakeServer(onConnect);
    try {
      const r = await runSnapload(["serve", "--socket", join(dir.path, "c.sock"), "--mem", `tcp://127.0.0.1:${port}`, "--token-file", tokenFile, "--page-server-deadline", "2000"], { timeoutMs: 10_000 });
      return { code: r.code, stderr: r.stderr };
    } finally {
      server.close();
    }
  }

  test("garbage instead of a CHALLENGE", async () => {
    const r = await serveAgainst((s) => s.once("data", () => s.write(Buffer.alloc(64, 0xee))));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/page server tcp:\/\/127\.0\.0\.1:\d+: .*unknown frame type 238/);
  });

  test("a server that does not hold our token (its proof is wrong)", async () => {
    const r = await serveAgainst((s) => {
      let stage = 0;
      s.on("data", (d) => {
        if (stage++ === 0) {
          const p = new Uint8Array(48);
          new DataView(p.buffer).setUint32(0, 0x5350_4c53, true);
          new DataView(p.buffer).setUint16(4, PROTOCOL_VERSION, true);
          s.write(frame(FrameType.CHALLENGE, p));
        } else if (d.length >= HEADER_SIZE) {
          s.write(frame(FrameType.WELCOME, encodeWelcome(new Uint8Array(32).fill(3))));
        }
      });
    });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/proof does not match our token/);
  });

  test("a server that never answers: the deadline, then a clear error", async () => {
    const t0 = Date.now();
    const r = await serveAgainst(() => {});
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/not reachable within 2000 ms.*no answer to the handshake/);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1900);
  });
});

describe("a page server that authenticates but does not deliver: the VM is killed at the deadline", () => {
  for (const mode of ["pong", "silent"] as const) {
    test(mode === "pong" ? "it answers pings, never pages" : "it goes silent after the handshake", async () => {
      const fake = await misbehavingPageServer(token, IMAGE_BYTES, mode);
      const sock = join(dir.path, `mis-${mode}.sock`);
      const d = await startDaemon(["--mem", `tcp://127.0.0.1:${fake.port}`, "--token-file", tokenFile, "--page-server-deadline", "1500", "--log-format", "json", "--log-level", "debug"], sock);
      try {
        const t0 = Date.now();
        const vm = Bun.spawn([STANDIN, "--socket", sock, "--expect", image, "--order", "random", "--verify", "none", "--timeout", "20000"], { stdout: "pipe", stderr: "pipe" });
        await vm.exited;
        expect(vm.signalCode).toBe("SIGKILL");
        expect(Date.now() - t0).toBeGreaterThanOrEqual(1400);
        expect(await d.waitForEvent("vm.failed")).toMatchObject({ vm: 1, pid: vm.pid, code: "PEER_GONE", action: "killed" });
        // It never delivered a page: the stall clock runs from the VM's connect, whatever the connections do.
        const done = await d.waitForEvent("remote.done", (e) => e.vm === 1);
        expect(done.bytes).toBe(0);
        expect(done.requests).toBeGreaterThan(0);
        if (mode === "silent") {
          // Silence is noticed (ping, then give the connection up) and the client reconnects meanwhile.
          expect(d.events().find((e) => e.event === "remote.lost" && e.vm === 1)).toMatchObject({ kind: "timeout", connected: true });
          expect(fake.authenticated()).toBeGreaterThanOrEqual(4); // probe, the pair, and at least one reconnect
        }
      } finally {
        await d.stop();
        fake.server.close();
      }
    }, 15_000);
  }
});
