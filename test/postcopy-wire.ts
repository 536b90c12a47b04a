// Test plumbing for the postcopy protocol: a page-server process, and a raw client that speaks
// (or deliberately breaks) the wire format over node:net. Only tests use node:net; snapload's own
// data path is C sockets in its EventLoop.
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { clientProof, nonce, serverProof, sessionKeys, type Transcript } from "../src/postcopy/auth.ts";
import {
  decodeHeader, decodeHello, encodeChallenge, encodeHello, encodeInfo, encodeWelcome, FrameHeader, FrameType, frame, HEADER_SIZE,
  PROTOCOL_VERSION, type Role, WANT_ZERO_MAP,
} from "../src/postcopy/protocol.ts";
import { ReceiveSeal, SEALED_HEADER_SIZE, SendSeal } from "../src/postcopy/seal.ts";
import { BUN, Daemon, logsJson, ROOT } from "./harness.ts";

export interface PageServerProc {
  daemon: Daemon;
  port: number;
}

/** Starts `snapload page-server` and waits until it listens (port 0 = any). */
/**
 * `snapload page-server --listen 127.0.0.1:PORT ARGS...`; with `faults` (e.g. `["--corrupt-every", "50"]`)
 * the same server built by test/fixtures/faulty-page-server.ts, which injects them.
 */
export async function startPageServer(args: string[], port = 0, faults: string[] = [], extraEnv: Record<string, string> = {}): Promise<PageServerProc> {
  const program = faults.length ? [join(ROOT, "test/fixtures/faulty-page-server.ts"), ...faults, "--"] : [join(ROOT, "src/main.ts"), "page-server"];
  const proc = Bun.spawn([BUN, ...program, "--listen", `127.0.0.1:${port}`, ...args], {
    env: { ...process.env, ...extraEnv },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const daemon = new Daemon(proc, "");
  if (logsJson(args)) return { daemon, port: Number((await daemon.waitForEvent("page_server.listening")).port) };
  const m = await daemon.waitForLog(/page server listening on 127\.0\.0\.1:(\d+)/);
  return { daemon, port: Number(m[1]) };
}

export interface RawFrame {
  type: number;
  id: number;
  offset: number;
  arg: number;
  payload: Buffer;
}

/**
 * Whole frames from a byte stream, clear until `switchAfter` hands it the key for the frames
 * after the one it was given (the handshake's last frame), sealed from then on. Throws SealError.
 */
export class FrameParser {
  private buf = Buffer.alloc(0);
  private seal: ReceiveSeal | undefined;
  constructor(private readonly switchAfter: (f: RawFrame) => ReceiveSeal | undefined) {}

  push(d: Buffer): RawFrame[] {
    this.buf = Buffer.concat([this.buf, d]);
    const out: RawFrame[] = [];
    const h = new FrameHeader();
    for (;;) {
      const hs = this.seal ? SEALED_HEADER_SIZE : HEADER_SIZE;
      if (this.buf.length < hs) break;
      const hdr = new Uint8Array(this.buf.subarray(0, hs));
      this.seal?.openHeader(hdr);
      decodeHeader(new DataView(hdr.buffer), 0, h);
      if (this.buf.length < hs + h.length) break;
      const payload = new Uint8Array(this.buf.subarray(hs, hs + h.length));
      if (this.seal) {
        if (h.length > 0) this.seal.openPayload(payload, h.length);
        this.seal.next();
      }
      const f = { type: h.type, id: h.id, offset: h.offset, arg: h.arg, payload: Buffer.from(payload) };
      out.push(f);
      this.buf = this.buf.subarray(hs + h.length);
      if (!this.seal) this.seal = this.switchAfter(f);
    }
    return out;
  }
}

/** A hand-driven protocol client: send any bytes, read whole frames; sealed once authenticated. */
export class RawClient {
  readonly frames: RawFrame[] = [];
  closed = false;
  /** The parser or opener refused what came (e.g. a frame failing authentication). */
  error: Error | undefined;
  private waiters: (() => void)[] = [];
  private pendingKeys: ReturnType<typeof sessionKeys> | undefined;
  private sendSeal: SendSeal | undefined;
  private readonly parser = new FrameParser((f) => {
    if (f.type !== FrameType.WELCOME || this.pendingKeys === undefined) return undefined;
    this.sendSeal = new SendSeal(this.pendingKeys.clientToServer);
    return new ReceiveSeal(this.pendingKeys.serverToClient);
  });
  private constructor(readonly socket: Socket) {
    socket.on("data", (d) => {
      try {
        this.frames.push(...this.parser.push(d as Buffer));
      } catch (e) {
        this.error = e as Error;
        socket.destroy();
      }
      this.wake();
    });
    socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    socket.on("error", () => {});
  }

  /** `from`: a local (loopback) source address, to look like another host. */
  static connect(port: number, from?: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = createConnection({ host: "127.0.0.1", port, localAddress: from }, () => resolve(new RawClient(s)));
      s.once("error", reject);
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** A whole frame as it goes on the wire now: sealed once authenticated, as is before (the next sequence number is used up). */
  wire(frameBytes: Uint8Array): Uint8Array {
    return this.sendSeal ? this.sendSeal.frame(frameBytes) : frameBytes;
  }

  /** Sends a whole frame: sealed once authenticated, as is before. */
  send(frameBytes: Uint8Array): void {
    this.socket.write(this.wire(frameBytes));
  }

  /** Sends bytes exactly as given. */
  sendRaw(bytes: Uint8Array): void {
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

  /**
   * HELLO, CHALLENGE, AUTH, WELCOME: returns the WELCOME frame (or the ERROR that refused us);
   * from then on both directions are sealed, and the sealed INFO frame is the next to read.
   */
  async authenticate(token: Buffer, role: Role, flags = 0): Promise<RawFrame & { expectedProof?: Uint8Array }> {
    const hello = encodeHello({ versionMin: PROTOCOL_VERSION, versionMax: PROTOCOL_VERSION, role, flags, nonce: nonce() });
    this.send(frame(FrameType.HELLO, hello));
    const ch = await this.next();
    if (ch.type !== FrameType.CHALLENGE) return ch;
    const t: Transcript = { hello, challenge: new Uint8Array(ch.payload) };
    this.pendingKeys = sessionKeys(token, t);
    this.send(frame(FrameType.AUTH, clientProof(token, t)));
    const w = await this.next();
    return w.type === FrameType.WELCOME ? { ...w, expectedProof: serverProof(token, t) } : w;
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
    let hello: Uint8Array | undefined;
    let keys: ReturnType<typeof sessionKeys> | undefined;
    let out: SendSeal | undefined;
    let wantZeroMap = false;
    const parser = new FrameParser((f) => (f.type === FrameType.AUTH && keys ? new ReceiveSeal(keys.clientToServer) : undefined));
    const send = (bytes: Uint8Array) => s.write(out ? out.frame(bytes) : bytes);
    s.on("error", () => {});
    s.on("data", (d) => {
      let frames: RawFrame[];
      try {
        frames = parser.push(d as Buffer);
      } catch {
        return void s.destroy();
      }
      for (const f of frames) {
        if (f.type === FrameType.HELLO) {
          hello = new Uint8Array(f.payload);
          wantZeroMap = (decodeHello(hello).flags & WANT_ZERO_MAP) !== 0;
          const challenge = encodeChallenge(PROTOCOL_VERSION, nonce());
          keys = sessionKeys(token, { hello, challenge });
          send(frame(FrameType.CHALLENGE, challenge));
          (s as Socket & { transcript?: Transcript }).transcript = { hello, challenge };
        } else if (f.type === FrameType.AUTH) {
          authenticated++;
          const t = (s as Socket & { transcript?: Transcript }).transcript!;
          send(frame(FrameType.WELCOME, encodeWelcome(serverProof(token, t))));
          out = new SendSeal(keys!.serverToClient);
          const pages = Math.ceil(size / 4096);
          send(frame(FrameType.INFO, encodeInfo({ size, pages, dataPages: pages, id: new Uint8Array(16).fill(0x42) })));
          if (wantZeroMap) send(frame(FrameType.ZERO_MAP, new Uint8Array(Math.ceil(pages / 8))));
        } else if (f.type === FrameType.PING && mode === "pong") {
          send(frame(FrameType.PONG, null, f.id));
        }
      }
    });
  });
  return { server, port, authenticated: () => authenticated };
}
