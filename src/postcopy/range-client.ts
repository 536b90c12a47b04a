// `qemu-restore --mem tcp://HOST:PORT`: a snapshot file served whole by `snapload page-server
// --whole-file`, read by byte range over the page-server protocol. Only what is specific to byte
// ranges of a file is here (cutting reads into requests, assembling replies, handing them to the
// QEMU sink); the rest is the daemon's client's own parts: the two connections, their reconnects,
// pings, silence timeout, same-image check and deadline (channel-pair.ts), what each connection
// owes and gives back when lost (in-flight.ts), and the receive buffers (slot-pool.ts). So a page
// server that dies or freezes is handled as for a Firecracker VM: what was asked stays owed and
// is asked again once it is back; only past the deadline does a read fail (never a zero or a
// guess). A frame that fails authentication drops its connection; nothing of it is used.
//
// The QEMU sink runs on Bun's own loop (node:net); the channels live in an EventLoop that hands
// the thread back to Bun every turn (asyncPending), so both make progress in one thread.
import { ConfigError, type ErrorCode, SnaploadError } from "../core/errors.ts";
import { EventLoop } from "../core/event-loop.ts";
import type { NativeBuffer } from "../core/ffi.ts";
import type { Fields } from "../core/log.ts";
import type { ZeroMap } from "../sources/image/snapshot-image.ts";
import type { SourceOptions } from "../sources/port.ts";
import type { RemoteFile } from "../sources/remote-file.ts";
import { type HostPort, parseTcpUrl, resolveHost } from "./address.ts";
import { checkCrypto } from "./aead.ts";
import { readTokenFile } from "./auth.ts";
import { BACKGROUND, ChannelPair, type PairContext, URGENT } from "./channel-pair.ts";
import { ClientChannel } from "./client-channel.ts";
import { InFlight, type InFlightRequest } from "./in-flight.ts";
import { checkDataChunk, frame, type FrameHeader, FrameType, type ImageInfo, ProtocolError, Role, WIRE_PAGE } from "./protocol.ts";
import { probe } from "./remote-source.ts";
import { SlotPool } from "./slot-pool.ts";

const HANDSHAKE_TIMEOUT_MS = 5000;
/** Reads are cut into requests of at most this many bytes, each received into one slot. */
const SLOT = 512 * 1024;

/** One request: file bytes [start, start+bytes), a slot's worth at most. */
interface RangeRequest extends InFlightRequest {
  start: number;
  slot: NativeBuffer | undefined;
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
  readonly #slots = new SlotPool(SLOT);
  readonly #inFlight = new InFlight<RangeRequest>();
  /** Waiting to be sent, per connection (URGENT, BACKGROUND). */
  readonly #queues: RangeRequest[][] = [[], []];
  readonly #link: ChannelPair;
  #nextId = 1;
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
    const ctx: PairContext = { loop: this.#loop, logger: opts.logger, fail: (code: ErrorCode, detail: string) => this.#fail(new SnaploadError(code, detail)) };
    const owed = () => this.#inFlight.size + this.#queues[URGENT]!.length + this.#queues[BACKGROUND]!.length;
    this.#link = new ChannelPair(undefined, ctx, { url, info, deadlineMs: opts.deadlineMs }, this.#counters, {
      open: (i) => this.#connect(i),
      outstanding: owed,
      unanswered: owed,
      owes: (i) => this.#inFlight.owes(i === URGENT),
      takeBack: (i) => {
        // What was asked on that connection is asked again, first, in the order it was asked.
        const again = this.#inFlight.takeBack(i === URGENT);
        this.#queues[i]!.unshift(...again);
        return again.length;
      },
      resume: (i) => this.#send(i),
    });
    this.#link.start();
    this.#running = this.#loop.run();
  }

  read(off: number, len: number, urgent: boolean): Promise<Uint8Array> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (off % WIRE_PAGE !== 0 || len % WIRE_PAGE !== 0 || len <= 0 || off + len > this.info.pages * WIRE_PAGE) {
      return Promise.reject(new SnaploadError("BAD_CONFIG", `${this.url}: read of [${off}, +${len}) is not whole pages of the ${this.size}-byte file`));
    }
    const parts: Promise<Uint8Array>[] = [];
    for (let at = off; at < off + len; at += SLOT) parts.push(this.#request(at, Math.min(SLOT, off + len - at), urgent));
    if (parts.length === 1) return parts[0]!;
    return Promise.all(parts).then((bufs) => {
      const out = new Uint8Array(len);
      bufs.forEach((b, i) => out.set(b, i * SLOT));
      return out;
    });
  }

  #request(start: number, bytes: number, urgent: boolean): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      if (this.zero.isRangeZero(start / WIRE_PAGE, bytes / WIRE_PAGE)) return resolve(new Uint8Array(bytes));
      const req: RangeRequest = { id: this.#nextId++, start, bytes, urgent, sent: false, slot: undefined, cursor: 0, resolve, reject };
      const i = urgent ? URGENT : BACKGROUND;
      this.#queues[i]!.push(req);
      this.#send(i);
    });
  }

  #send(i: number): void {
    const ch = this.#link.ready(i);
    if (ch === undefined) return;
    const q = this.#queues[i]!;
    while (q.length) {
      const req = q.shift()!;
      req.slot ??= this.#slots.take();
      req.cursor = 0; // a reply cut short by a lost connection starts over
      // The silence and progress clocks of a connection start when it starts owing us something.
      if (!this.#inFlight.owes(req.urgent)) this.#link.startOwing(i, ch);
      this.#inFlight.add(req);
      this.#counters.requests++;
      ch.send(frame(FrameType.REQUEST, null, req.id, req.start, req.bytes), false);
    }
    ch.flush();
  }

  #connect(i: number): ClientChannel {
    const ch: ClientChannel = new ClientChannel(this.#loop, this.addr, this.token, i === URGENT ? Role.URGENT : Role.BACKGROUND, false, {
      ready: (info) => this.#link.onReady(i, ch, info),
      dataTarget: (h) => this.#dataTarget(h),
      data: (h) => {
        // Only bytes we still wait for are progress (not a replay of stale ids).
        if (this.#inFlight.byId.has(h.id)) this.#link.progress(i);
        this.#onData(h);
      },
      requestError: (id, message) => {
        const req = this.#inFlight.byId.get(id);
        if (req) this.#fail(new SnaploadError("PEER_GONE", `page server ${this.url} refused bytes [0x${req.start.toString(16)}, +${req.bytes}): ${message}`));
      },
      lost: (reason, kind) => this.#link.onLost(i, reason, kind),
    }, Math.min(HANDSHAKE_TIMEOUT_MS, this.opts.deadlineMs));
    return ch;
  }

  #dataTarget(h: FrameHeader): number {
    const req = this.#inFlight.byId.get(h.id);
    if (req === undefined) {
      // A request given up (the read failed): its late chunks are dropped.
      if (h.id > 0 && h.id < this.#nextId) return -1;
      throw new ProtocolError(`DATA for request ${h.id}, which was never made`);
    }
    // Zero pages never cross the wire: the chunk holds data pages only, and what it skipped is zero.
    checkDataChunk(h.id, h.offset, h.length, req.cursor, req.start, req.bytes, this.zero);
    return req.slot!.address + h.offset;
  }

  #onData(h: FrameHeader): void {
    const req = this.#inFlight.byId.get(h.id);
    if (req === undefined) return;
    // Authenticated and decrypted in place by the channel before we hear of it.
    this.#counters.bytes += h.length;
    req.cursor = h.offset + h.length;
    const restFirst = (req.start + req.cursor) / WIRE_PAGE;
    const restCount = (req.bytes - req.cursor) / WIRE_PAGE;
    if (restCount !== 0 && !this.zero.isRangeZero(restFirst, restCount)) return;
    this.#inFlight.remove(req);
    const slot = req.slot!;
    req.slot = undefined;
    // The zero pages never came (and the slot may hold an earlier request's bytes): write them.
    for (const run of this.zero.runs(req.start / WIRE_PAGE, req.bytes / WIRE_PAGE)) {
      if (run.zero) slot.bytes.fill(0, run.first * WIRE_PAGE - req.start, (run.first + run.count) * WIRE_PAGE - req.start);
    }
    const out = slot.bytes.slice(0, req.bytes);
    this.#slots.give(slot);
    req.resolve(out);
  }

  /** The page server is gone past the deadline, refused, or we are closed: every read fails from now on. */
  #fail(e: Error): void {
    if (this.#failure) return;
    this.#failure = e;
    this.#link.close();
    const all = [...this.#inFlight.byId.values(), ...this.#queues[URGENT]!, ...this.#queues[BACKGROUND]!];
    for (const r of all) this.#inFlight.remove(r);
    this.#queues[URGENT]!.length = 0;
    this.#queues[BACKGROUND]!.length = 0;
    for (const r of all) {
      if (r.slot !== undefined) this.#slots.give(r.slot);
      r.slot = undefined;
      r.reject(e);
    }
  }

  report(): { text: string; fields: Fields } {
    const c = this.#counters;
    return {
      text: `page server ${this.url}: ${c.requests} requests, ${c.bytes} bytes received, ${c.reconnects} reconnects, ${c.tampered} connections dropped for frames failing authentication`,
      fields: { requests: c.requests, bytes: c.bytes, reconnects: c.reconnects, tampered: c.tampered },
    };
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#fail(new SnaploadError("PEER_GONE", "closed"));
    this.#slots.close();
    this.#loop.stop();
    void this.#running.then(() => this.#loop.close());
  }
}
