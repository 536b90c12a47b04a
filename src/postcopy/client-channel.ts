// One client connection to a page server: connect, HELLO, prove the token, check the server's
// proof, then frames. Lives in our EventLoop on a C socket. When anything goes wrong it closes
// itself and tells its owner once, with a kind the owner can act on (retry, or give up).
import type { EventLoop } from "../event-loop.ts";
import { cstr, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, errnoName, NativeBuffer, sl } from "../ffi.ts";
import type { HostPort } from "./address.ts";
import { clientProof, nonce, proofsEqual, serverProof } from "./auth.ts";
import {
  decodeChallenge, decodeErrorText, decodeWelcome, encodeHello, ErrorCode, errorFrame, errorText, frame, FRAME_NAMES, type FrameHeader,
  FrameType, type ImageInfo, MAX_CHUNK, MAX_ZERO_MAP_CHUNK, PROTOCOL_VERSION, ProtocolError, type Role, WANT_ZERO_MAP,
} from "./protocol.ts";
import { FrameReader, FrameWriter, READ_EOF, SEND_BLOCKED, SENT_ALL } from "./wire.ts";

/** Why a channel ended: `io` and `timeout` are worth a retry; the others need a person. */
export type LostKind = "io" | "timeout" | "protocol" | "auth" | "version" | "refused";

export interface ChannelOwner {
  /** Authenticated both ways; `zeroBits` only when the zero map was asked for. */
  ready(info: ImageInfo, zeroBits: Uint8Array | undefined): void;
  /** Where a DATA payload goes (an address), or -1 to drop it. Throws ProtocolError to refuse the frame. */
  dataTarget(h: FrameHeader): number;
  /** A DATA frame's payload is in place. */
  data(h: FrameHeader): void;
  /** The server refused one request (the connection stays). */
  requestError(id: number, message: string): void;
  /** The connection is gone; called once, after the channel closed itself. */
  lost(reason: string, kind: LostKind): void;
}

type State = "connecting" | "challenge" | "welcome" | "zero-map" | "ready" | "closed";

/** Bytes read per wake-up, so a background stream leaves room for faults. */
const READ_BUDGET = 256 * 1024;

export class ClientChannel {
  private state: State = "connecting";
  private fd = -1;
  private token = -1;
  private events = 0;
  private readonly reader: FrameReader;
  private readonly writer = new FrameWriter();
  private readonly clientNonce = nonce();
  private serverNonce: Uint8Array | undefined;
  private info: ImageInfo | undefined;
  private zeroBits: Uint8Array | undefined;
  private zeroFill = 0;
  private discard: NativeBuffer | undefined;
  private cancelTimer: () => void = () => {};
  /** performance.now() of the last byte received (liveness). */
  lastRxAt = performance.now();

  constructor(
    private readonly loop: EventLoop,
    addr: HostPort,
    private readonly secret: Buffer,
    private readonly role: Role,
    private readonly wantZeroMap: boolean,
    private readonly owner: ChannelOwner,
    handshakeTimeoutMs: number,
  ) {
    this.reader = new FrameReader(
      { target: (h) => this.target(h), frame: (h, own) => this.onFrame(h, own) },
      wantZeroMap ? MAX_ZERO_MAP_CHUNK : undefined,
    );
    this.cancelTimer = loop.after(handshakeTimeoutMs, () => this.lose(`no answer to the handshake within ${handshakeTimeoutMs} ms`, "timeout"));
    const fd = sl.sl_tcp_connect(cstr(addr.host), addr.port);
    if (fd < 0) {
      // Report from the loop, not from inside our owner's constructor call.
      this.loop.after(0, () => this.lose(`connect failed: ${errnoName(-fd)}`, "io"));
      return;
    }
    this.fd = fd;
    this.events = EPOLLOUT | EPOLLRDHUP;
    this.token = loop.add(fd, this.events, (ev) => this.onEvents(ev));
  }

  get ready(): boolean {
    return this.state === "ready";
  }

  /** Queues a frame and (unless `now` is false: the caller flushes a batch) sends what the socket takes. */
  send(bytes: Uint8Array, now = true): void {
    if (this.state === "closed") return;
    this.writer.push(bytes);
    if (now && this.state !== "connecting") this.flush();
  }

  private onEvents(ev: number): void {
    if (this.state === "connecting") {
      if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
      const err = sl.sl_socket_error(this.fd);
      if (err < 0) return this.lose(`connect failed: ${errnoName(-err)}`, "io");
      this.state = "challenge";
      this.setEvents(EPOLLIN | EPOLLRDHUP);
      const hello = { versionMin: PROTOCOL_VERSION, versionMax: PROTOCOL_VERSION, role: this.role, flags: this.wantZeroMap ? WANT_ZERO_MAP : 0, nonce: this.clientNonce };
      this.send(frame(FrameType.HELLO, encodeHello(hello)));
      return;
    }
    if (ev & EPOLLOUT && this.state !== "closed") this.flush();
    if (this.state === "closed" || !(ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    let r: number;
    const before = this.reader.received;
    try {
      r = this.reader.read(this.fd, READ_BUDGET);
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      // Tell the server why, then drop the connection.
      const bye = errorFrame(e.wireCode, e.message);
      sl.sl_send(this.fd, bye, bye.length);
      return this.lose(`bad frame from the page server: ${e.message}`, e.wireCode === ErrorCode.AUTH_FAILED ? "auth" : "protocol");
    }
    if (this.reader.received !== before) this.lastRxAt = performance.now();
    if (r === READ_EOF) return this.lose(this.state === "ready" ? "the page server closed the connection" : "the page server closed the connection during the handshake", "io");
    if (r < 0) return this.lose(`connection failed: ${errnoName(-r)}`, "io");
    // READ_AGAIN: drained; READ_MORE: budget used, epoll (level-triggered) reports us again.
  }

  private target(h: FrameHeader): number {
    const t = h.type;
    if (t === FrameType.ERROR) return -1;
    switch (this.state) {
      case "challenge":
        if (t === FrameType.CHALLENGE) return -1;
        break;
      case "welcome":
        if (t === FrameType.WELCOME) return -1;
        break;
      case "zero-map":
        if (t === FrameType.ZERO_MAP) return -1;
        break;
      case "ready":
        if (t === FrameType.PONG) return -1;
        if (t === FrameType.DATA) {
          const at = this.owner.dataTarget(h);
          if (at >= 0) return at;
          this.discard ??= new NativeBuffer(MAX_CHUNK);
          return this.discard.address;
        }
        break;
    }
    throw new ProtocolError(`unexpected ${FRAME_NAMES[t]} frame while ${this.state === "ready" ? "serving requests" : `waiting for ${this.state.toUpperCase()}`}`);
  }

  private onFrame(h: FrameHeader, own: Uint8Array | null): void {
    switch (h.type) {
      case FrameType.DATA:
        return this.owner.data(h);
      case FrameType.PONG:
        return;
      case FrameType.ERROR: {
        const text = decodeErrorText(own!);
        if (h.id !== 0 && this.state === "ready") return this.owner.requestError(h.id, errorText(h.arg, text));
        const kind: LostKind = h.arg === ErrorCode.AUTH_FAILED ? "auth" : h.arg === ErrorCode.VERSION ? "version" : "refused";
        return this.lose(`the page server refused us: ${text}`, kind);
      }
      case FrameType.CHALLENGE: {
        const c = decodeChallenge(own!);
        if (c.version !== PROTOCOL_VERSION) throw new ProtocolError(`the page server chose protocol version ${c.version}; we speak ${PROTOCOL_VERSION}`, ErrorCode.VERSION);
        this.serverNonce = c.nonce;
        this.state = "welcome";
        this.send(frame(FrameType.AUTH, clientProof(this.secret, c.nonce, this.clientNonce)));
        return;
      }
      case FrameType.WELCOME: {
        const w = decodeWelcome(own!);
        // Mutual: a server that does not hold the token must not feed pages to our VMs.
        if (!proofsEqual(w.proof, serverProof(this.secret, this.clientNonce, this.serverNonce!))) {
          throw new ProtocolError("the page server's proof does not match our token (is --token-file the same on both sides?)", ErrorCode.AUTH_FAILED);
        }
        this.info = w.info;
        if (this.wantZeroMap) {
          this.zeroBits = new Uint8Array(Math.ceil(w.info.pages / 8));
          this.state = "zero-map";
          return;
        }
        return this.becomeReady();
      }
      case FrameType.ZERO_MAP: {
        const bits = this.zeroBits!;
        const part = own!;
        if (h.offset !== this.zeroFill || part.length === 0 || this.zeroFill + part.length > bits.length) {
          throw new ProtocolError(`ZERO_MAP frame for bytes [${h.offset}, +${part.length}) where [${this.zeroFill}, ${bits.length}) was due`);
        }
        if (Bun.hash.crc32(part) !== h.crc) throw new ProtocolError("ZERO_MAP frame failed its checksum");
        bits.set(part, this.zeroFill);
        this.zeroFill += part.length;
        if (this.zeroFill === bits.length) this.becomeReady();
        return;
      }
    }
  }

  private becomeReady(): void {
    this.cancelTimer();
    this.state = "ready";
    this.owner.ready(this.info!, this.zeroBits);
  }

  /** Liveness probe; any bytes back count. */
  ping(): void {
    if (this.state === "ready") this.send(frame(FrameType.PING, null));
  }

  flush(): void {
    if (this.state === "closed" || this.state === "connecting") return;
    const r = this.writer.empty ? SENT_ALL : this.writer.flush(this.fd);
    if (r === SENT_ALL) {
      if (this.events & EPOLLOUT) this.setEvents(EPOLLIN | EPOLLRDHUP);
    } else if (r === SEND_BLOCKED) {
      if (!(this.events & EPOLLOUT)) this.setEvents(EPOLLIN | EPOLLRDHUP | EPOLLOUT);
    } else {
      this.lose(`send failed: ${errnoName(-r)}`, "io");
    }
  }

  private setEvents(events: number): void {
    this.events = events;
    this.loop.modify(this.token, this.fd, events);
  }

  private lose(reason: string, kind: LostKind): void {
    if (this.state === "closed") return;
    this.close();
    this.owner.lost(reason, kind);
  }

  /** Closes without telling the owner (the owner asked). */
  close(): void {
    if (this.state === "closed") return;
    this.state = "closed";
    this.cancelTimer();
    if (this.fd >= 0) {
      this.loop.remove(this.token, this.fd);
      sl.sl_close(this.fd);
      this.fd = -1;
    }
    this.reader.stop();
    this.writer.clear();
    this.discard?.free();
  }
}
