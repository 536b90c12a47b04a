// Test plumbing for the postcopy protocol: a page-server process, and a raw client that speaks
// (or deliberately breaks) the wire format over node:net. Only tests use node:net; snapload's own
// data path is C sockets in its EventLoop.
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { clientProof, nonce, serverProof } from "../src/postcopy/auth.ts";
import {
  decodeChallenge, decodeHeader, decodeHello, encodeChallenge, encodeHello, encodeWelcome, FrameHeader, FrameType, frame, HEADER_SIZE,
  PROTOCOL_VERSION, type Role, WANT_ZERO_MAP,
} from "../src/postcopy/protocol.ts";
import { BUN, Daemon, ROOT } from "./harness.ts";

export interface PageServerProc {
  daemon: Daemon;
  port: number;
}

/** Starts `snapload page-server` and waits until it listens (port 0 = any). */
export async function startPageServer(args: string[], port = 0): Promise<PageServerProc> {
  const proc = Bun.spawn([BUN, join(ROOT, "src/main.ts"), "page-server", "--listen", `127.0.0.1:${port}`, ...args], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const daemon = new Daemon(proc, "");
  const m = await daemon.waitForLog(/page server listening on 127\.0\.0\.1:(\d+)/);
  return { daemon, port: Number(m[1]) };
}

export interface RawFrame {
  type: number;
  id: number;
  offset: number;
  arg: number;
  crc: number;
  payload: Buffer;
}

/** A hand-driven protocol client: send any bytes, read whole frames. */
export class RawClient {
  private buf = Buffer.alloc(0);
  readonly frames: RawFrame[] = [];
  closed = false;
  private waiters: (() => void)[] = [];
  private constructor(readonly socket: Socket) {
    socket.on("data", (d) => {
      this.buf = Buffer.concat([this.buf, d as Buffer]);
      this.parse();
      this.wake();
    });
    socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    socket.on("error", () => {});
  }

  static connect(port: number): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = createConnection({ host: "127.0.0.1", port }, () => resolve(new RawClient(s)));
      s.once("error", reject);
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private parse(): void {
    const h = new FrameHeader();
    while (this.buf.length >= HEADER_SIZE) {
      decodeHeader(new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.length), 0, h);
      if (this.buf.length < HEADER_SIZE + h.length) return;
      this.frames.push({ type: h.type, id: h.id, offset: h.offset, arg: h.arg, crc: h.crc, payload: Buffer.from(this.buf.subarray(HEADER_SIZE, HEADER_SIZE + h.length)) });
      this.buf = this.buf.subarray(HEADER_SIZE + h.length);
    }
  }

  send(bytes: Uint8Array): void {
    this.socket.write(bytes);
  }

  /** The next frame matching `pred` (removed from the list), or an error after timeoutMs. */
  async next(pred: (f: RawFrame) => boolean = () => true, timeoutMs = 5000): Promise<RawFrame> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.frames.findIndex(pred);
      if (i >= 0) return this.frames.splice(i, 1)[0]!;
      if (this.closed) throw new Error(`connection closed; frames left: ${this.frames.map((f) => f.type).join(",")}`);
      if (Date.now() > deadline) throw new Error("no such frame in time");
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
  }

  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise<void>((r) => {
      this.waiters.push(r);
      setTimeout(r, 50);
    });
    return this.closed;
  }

  /** HELLO, CHALLENGE, AUTH, WELCOME: returns the WELCOME frame (or the ERROR that refused us). */
  async authenticate(token: Buffer, role: Role, flags = 0): Promise<RawFrame> {
    const cn = nonce();
    this.send(frame(FrameType.HELLO, encodeHello({ versionMin: PROTOCOL_VERSION, versionMax: PROTOCOL_VERSION, role, flags, nonce: cn })));
    const ch = await this.next();
    if (ch.type !== FrameType.CHALLENGE) return ch;
    const sn = decodeChallenge(ch.payload).nonce;
    this.send(frame(FrameType.AUTH, clientProof(token, sn, cn)));
    const w = await this.next();
    if (w.type === FrameType.WELCOME) (w as RawFrame & { expectedProof: Uint8Array }).expectedProof = serverProof(token, cn, sn);
    return w;
  }

  close(): void {
    this.socket.destroy();
  }
}

/** A fake page server for client-side tests: `onConnect` scripts what it sends. */
export async function fakeServer(onConnect: (s: Socket) => void): Promise<{ server: Server; port: number }> {
  const server = createServer(onConnect);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const addr = server.address();
  if (addr === null || typeof addr === "string") throw new Error("no port");
  return { server, port: addr.port };
}

/**
 * A page server that authenticates properly, describes an all-data image of `size` bytes, then
 * misbehaves: "pong" answers PINGs but never sends a page; "silent" answers nothing after the
 * handshake. Counts the connections it authenticated.
 */
export async function misbehavingPageServer(token: Buffer, size: number, mode: "pong" | "silent"): Promise<{ server: Server; port: number; authenticated: () => number }> {
  let authenticated = 0;
  const { server, port } = await fakeServer((s) => {
    let buf = Buffer.alloc(0);
    let cn: Uint8Array | undefined;
    let sn: Uint8Array | undefined;
    let wantZeroMap = false;
    s.on("error", () => {});
    s.on("data", (d) => {
      buf = Buffer.concat([buf, d as Buffer]);
      const h = new FrameHeader();
      while (buf.length >= HEADER_SIZE) {
        decodeHeader(new DataView(buf.buffer, buf.byteOffset, buf.length), 0, h);
        if (buf.length < HEADER_SIZE + h.length) return;
        const payload = buf.subarray(HEADER_SIZE, HEADER_SIZE + h.length);
        buf = buf.subarray(HEADER_SIZE + h.length);
        if (h.type === FrameType.HELLO) {
          const hello = decodeHello(new Uint8Array(payload));
          cn = hello.nonce;
          wantZeroMap = (hello.flags & WANT_ZERO_MAP) !== 0;
          sn = nonce();
          s.write(frame(FrameType.CHALLENGE, encodeChallenge(PROTOCOL_VERSION, sn)));
        } else if (h.type === FrameType.AUTH) {
          authenticated++;
          const pages = Math.ceil(size / 4096);
          s.write(frame(FrameType.WELCOME, encodeWelcome(serverProof(token, cn!, sn!), { size, pages, dataPages: pages, id: new Uint8Array(16).fill(0x42) })));
          if (wantZeroMap) {
            const bits = new Uint8Array(Math.ceil(pages / 8));
            s.write(frame(FrameType.ZERO_MAP, bits, 0, 0, 0, Bun.hash.crc32(bits)));
          }
        } else if (h.type === FrameType.PING && mode === "pong") {
          s.write(frame(FrameType.PONG, null, h.id));
        }
      }
    });
  });
  return { server, port, authenticated: () => authenticated };
}
