// `qemu-restore --mem tcp://HOST:PORT`: a snapshot file served whole by `snapload page-server
// --whole-file`, read by byte range over the page-server protocol (the same handshake, sealed
// frames and probe as the daemon's client). Two connections, like the daemon's: ranges a guest
// waits for go on the urgent one, background ranges on the other. If the page server goes away,
// what was asked and not received stays owed: the connections reconnect with backoff and ask
// again, and only past the deadline does a read fail (never a zero or a guess). A frame that
// fails authentication drops its connection; nothing of it is used.
//
// The QEMU sink runs on Bun's own loop (node:net); the channels live in an EventLoop that hands
// the thread back to Bun every turn (asyncPending), so both make progress in one thread.
import { ConfigError, SnaploadError } from "../core/errors.ts";
import { EventLoop } from "../core/event-loop.ts";
import { NativeBuffer } from "../core/ffi.ts";
import type { ZeroMap } from "../sources/image/snapshot-image.ts";
import type { SourceOptions } from "../sources/port.ts";
import type { RemoteFile } from "../sources/remote-file.ts";
import { type HostPort, parseTcpUrl, resolveHost } from "./address.ts";
import { checkCrypto } from "./aead.ts";
import { readTokenFile } from "./auth.ts";
import { ClientChannel, type LostKind } from "./client-channel.ts";
import { checkDataChunk, frame, type FrameHeader, FrameType, type ImageInfo, MAX_REQUEST, ProtocolError, Role, WIRE_PAGE } from "./protocol.ts";
import { probe } from "./remote-source.ts";

const RECONNECT_FIRST_MS = 50;
const RECONNECT_MAX_MS = 1000;
const HANDSHAKE_TIMEOUT_MS = 5000;
const TICK_MS = 100;
const URGENT = 0;
const BACKGROUND = 1;
const CHANNEL_NAMES = ["urgent", "background"];

interface Req {
  id: number;
  start: number;
  bytes: number;
  urgent: boolean;
  buf: NativeBuffer;
  /** Next byte (within the request) a DATA frame may start at: chunks come in order. */
  cursor: number;
  resolve: (b: Uint8Array) => void;
  reject: (e: Error) => void;
}

export async function openRangeClient(url: string, opts: SourceOptions): Promise<RemoteFile> {
  if (opts.tokenFile === undefined) throw new ConfigError(`--mem ${url}: a page server needs --token-file (the secret both sides share)`);
  const token = readTokenFile(opts.tokenFile, opts.logger);
  checkCrypto();
  const addr = await resolveHost(parseTcpUrl(url), `--mem ${url}`);
  const { info, zero } = await probe(url, addr, token, opts);
  if (!info.wholeFile) {
    throw new ConfigError(`--mem ${url}: the page server serves guest memory (one image or RAM block), not the whole snapshot file qemu-restore needs; start it with --whole-file`);
  }
  return new RangeClient(url, addr, token, info, zero, opts);
}

class RangeClient implements RemoteFile {
  readonly size: number;
  readonly description: string;
  readonly #loop = new EventLoop();
  readonly #running: Promise<void>;
  readonly #channels: (ClientChannel | undefined)[] = [undefined, undefined];
  readonly #queues: Req[][] = [[], []];
  readonly #sent = new Map<number, Req>();
  readonly #backoff = [RECONNECT_FIRST_MS, RECONNECT_FIRST_MS];
  #nextId = 1;
  /** Since when something is owed and no working page server delivers it. */
  #stallSince: number | undefined;
  #outage = false;
  #outageSince = 0;
  #lastError = "";
  #closed = false;
  #failure: Error | undefined;
  readonly #counters = { requests: 0, bytes: 0, reconnects: 0, tampered: 0 };

  constructor(
    private readonly url: string,
    private readonly addr: HostPort,
    private readonly token: Buffer,
    private readonly info: ImageInfo,
    private readonly zero: ZeroMap,
    private readonly opts: SourceOptions,
  ) {
    this.size = info.size;
    this.description = url;
    this.#loop.asyncPending = 1; // every turn hands the thread to Bun (the sink's sockets)
    this.#connect(URGENT);
    this.#connect(BACKGROUND);
    this.#tick();
    this.#running = this.#loop.run();
  }

  read(off: number, len: number, urgent: boolean): Promise<Uint8Array> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (off % WIRE_PAGE !== 0 || len % WIRE_PAGE !== 0 || len <= 0 || off + len > this.info.pages * WIRE_PAGE) {
      return Promise.reject(new SnaploadError("BAD_CONFIG", `${this.url}: read of [${off}, +${len}) is not whole pages of the ${this.size}-byte file`));
    }
    const parts: Promise<Uint8Array>[] = [];
    for (let at = off; at < off + len; at += MAX_REQUEST) parts.push(this.#request(at, Math.min(MAX_REQUEST, off + len - at), urgent));
    if (parts.length === 1) return parts[0]!;
    return Promise.all(parts).then((bufs) => {
      const out = new Uint8Array(len);
      bufs.forEach((b, i) => out.set(b, i * MAX_REQUEST));
      return out;
    });
  }

  #request(start: number, bytes: number, urgent: boolean): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      if (this.zero.isRangeZero(start / WIRE_PAGE, bytes / WIRE_PAGE)) return resolve(new Uint8Array(bytes));
      const buf = new NativeBuffer(bytes);
      buf.bytes.fill(0); // zero pages never cross the wire
      const req: Req = { id: this.#nextId++, start, bytes, urgent, buf, cursor: 0, resolve, reject };
      this.#queues[urgent ? URGENT : BACKGROUND]!.push(req);
      this.#stallSince ??= performance.now();
      this.#send(urgent ? URGENT : BACKGROUND);
    });
  }

  #send(i: number): void {
    const ch = this.#channels[i];
    if (!ch?.ready) return;
    const q = this.#queues[i]!;
    while (q.length) {
      const req = q.shift()!;
      req.cursor = 0; // a reply cut short by a lost connection starts over
      this.#sent.set(req.id, req);
      this.#counters.requests++;
      ch.send(frame(FrameType.REQUEST, null, req.id, req.start, req.bytes), false);
    }
    ch.flush();
  }

  #connect(i: number): void {
    if (this.#closed) return;
    const ch: ClientChannel = new ClientChannel(this.#loop, this.addr, this.token, i === URGENT ? Role.URGENT : Role.BACKGROUND, false, {
      ready: (info) => this.#onReady(i, ch, info),
      dataTarget: (h) => this.#dataTarget(h),
      data: (h) => this.#onData(h),
      requestError: (id, message) => {
        const req = this.#sent.get(id);
        if (req) this.#fail(new SnaploadError("PEER_GONE", `page server ${this.url} refused bytes [0x${req.start.toString(16)}, +${req.bytes}): ${message}`));
      },
      lost: (reason, kind) => this.#onLost(i, reason, kind),
    }, Math.min(HANDSHAKE_TIMEOUT_MS, this.opts.deadlineMs));
    this.#channels[i] = ch;
  }

  #onReady(i: number, ch: ClientChannel, info: ImageInfo): void {
    const want = this.info;
    if (info.size !== want.size || info.pages !== want.pages || Buffer.compare(info.id, want.id) !== 0 || !info.wholeFile) {
      ch.close();
      this.#channels[i] = undefined;
      return this.#fail(new SnaploadError("PEER_GONE", `page server ${this.url} now serves a different file (${info.size} bytes; the restore started from ${want.size} bytes)`));
    }
    this.#backoff[i] = RECONNECT_FIRST_MS;
    if (this.#outage && this.#channels.every((c) => c?.ready)) {
      this.#outage = false;
      this.#counters.reconnects++;
      const stalledMs = performance.now() - this.#outageSince;
      this.opts.logger.info("remote.back", `page server ${this.url} is back after ${stalledMs.toFixed(0)} ms; outstanding requests re-sent`, { url: this.url, stalledMs });
    }
    this.#send(i);
  }

  #onLost(i: number, reason: string, kind: LostKind): void {
    this.#channels[i] = undefined;
    if (this.#closed) return;
    this.#lastError = reason;
    // What was asked on that connection is asked again, first, in the order it was asked.
    const again = [...this.#sent.values()].filter((r) => (r.urgent ? URGENT : BACKGROUND) === i).sort((a, b) => a.id - b.id);
    for (const r of again) this.#sent.delete(r.id);
    this.#queues[i]!.unshift(...again);
    if (again.length || this.#queues[i]!.length) this.#stallSince ??= performance.now();
    if (kind === "auth" || kind === "version" || kind === "refused") {
      return this.#fail(new SnaploadError(kind === "auth" ? "AUTH_FAILED" : "PEER_GONE", `page server ${this.url}: ${reason}`));
    }
    if (kind === "tampered") {
      this.#counters.tampered++;
      this.opts.logger.error("remote.tampered", `${CHANNEL_NAMES[i]} channel to ${this.url}: ${reason}; nothing of it used, connection dropped, ${again.length} requests re-sent`, {
        url: this.url, channel: CHANNEL_NAMES[i], reason, resend: again.length, deadlineMs: this.opts.deadlineMs,
      });
    } else if (!this.#outage) {
      this.#outage = true;
      this.#outageSince = performance.now();
      this.opts.logger.warn("remote.lost", `lost the page server ${this.url} (${CHANNEL_NAMES[i]} channel: ${reason}); reconnecting, giving up if it is not back within ${this.opts.deadlineMs} ms`, {
        url: this.url, channel: CHANNEL_NAMES[i], reason, kind, resend: again.length, deadlineMs: this.opts.deadlineMs,
      });
    }
    const delay = this.#backoff[i]!;
    this.#backoff[i] = Math.min(RECONNECT_MAX_MS, delay * 2);
    this.#loop.after(delay, () => this.#connect(i));
  }

  #dataTarget(h: FrameHeader): number {
    const req = this.#sent.get(h.id);
    if (req === undefined) {
      // A request asked again after its connection was lost: late chunks of the old one are dropped.
      if (h.id > 0 && h.id < this.#nextId) return -1;
      throw new ProtocolError(`DATA for request ${h.id}, which was never made`);
    }
    // Zero pages never cross the wire: the chunk holds data pages only, and what it skipped is zero.
    checkDataChunk(h.id, h.offset, h.length, req.cursor, req.start, req.bytes, this.zero);
    return req.buf.address + h.offset;
  }

  #onData(h: FrameHeader): void {
    const req = this.#sent.get(h.id);
    if (req === undefined) return;
    // Authenticated and decrypted in place by the channel before we hear of it.
    this.#counters.bytes += h.length;
    req.cursor = h.offset + h.length;
    const restFirst = (req.start + req.cursor) / WIRE_PAGE;
    const restCount = (req.bytes - req.cursor) / WIRE_PAGE;
    if (restCount !== 0 && !this.zero.isRangeZero(restFirst, restCount)) return;
    this.#sent.delete(req.id);
    const out = req.buf.bytes.slice(0, req.bytes);
    req.buf.free();
    if (this.#sent.size + this.#queues[0]!.length + this.#queues[1]!.length === 0) this.#stallSince = undefined;
    else this.#stallSince = performance.now(); // progress: the clock restarts
    req.resolve(out);
  }

  /** Past the deadline without a page server delivering: every read fails. */
  #tick(): void {
    this.#loop.after(TICK_MS, () => {
      if (this.#closed) return;
      const since = this.#stallSince;
      if (since !== undefined && performance.now() - since > this.opts.deadlineMs) {
        return this.#fail(new SnaploadError("PEER_GONE", `page server ${this.url} did not deliver within ${this.opts.deadlineMs} ms (--page-server-deadline; last: ${this.#lastError || "no answer"})`));
      }
      this.#tick();
    });
  }

  #fail(e: Error): void {
    if (this.#failure) return;
    this.#failure = e;
    const all = [...this.#sent.values(), ...this.#queues[0]!, ...this.#queues[1]!];
    this.#sent.clear();
    this.#queues[0]!.length = 0;
    this.#queues[1]!.length = 0;
    for (const r of all) {
      r.buf.free();
      r.reject(e);
    }
  }

  report(): string {
    const c = this.#counters;
    return `page server ${this.url}: ${c.requests} requests, ${c.bytes} bytes received, ${c.reconnects} reconnects, ${c.tampered} connections dropped for frames failing authentication`;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#fail(new SnaploadError("PEER_GONE", "closed"));
    for (const ch of this.#channels) ch?.close();
    this.#loop.stop();
    void this.#running.then(() => this.#loop.close());
  }
}
