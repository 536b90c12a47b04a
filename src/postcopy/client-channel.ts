// One client connection to a page server: connect, HELLO, prove the token, check the server's
// proof, then sealed frames (seal.ts) both ways. Lives in our EventLoop on a C socket. When
// anything goes wrong it closes itself and tells its owner once, with a kind the owner can act
// on (retry, or give up).
import type { EventLoop } from "../core/event-loop.ts";
import { cstr, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, errnoName, NativeBuffer, sl } from "../core/ffi.ts";
import type { HostPort } from "./address.ts";
import { clientProof, nonce, proofsEqual, serverProof, sessionKeys, type Transcript } from "./auth.ts";
import {
  decodeChallenge, decodeErrorText, decodeInfo, decodeWelcome, encodeHello, ErrorCode, errorFrame, errorText, frame, FRAME_NAMES, type FrameHeader,
  FrameType, type ImageInfo, MAX_CHUNK, MAX_ZERO_MAP_CHUNK, PROTOCOL_VERSION, ProtocolError, Role, WANT_ZERO_MAP,
} from "./protocol.ts";
import { ReceiveSeal, SealError, SendSeal } from "./seal.ts";
import { FrameReader, FrameWriter, READ_EOF, SEND_BLOCKED, SENT_ALL } from "./wire.ts";

/**
 * Why a channel ended: `io`, `timeout` and `tampered` (a frame failed authentication: changed in
 * transit) are worth a retry; the others need a person.
 */
export type LostKind = "io" | "timeout" | "protocol" | "auth" | "version" | "refused" | "tampered";

export interface ChannelOwner {
  /** Authenticated both ways; `zeroBits` only when the zero map was asked for. */
  ready(info: ImageInfo, zeroBits: Uint8Array | undefined): void;
  /** Where a DATA payload goes (an address), or -1 to drop it. Throws ProtocolError to refuse the frame. */
  dataTarget(h: FrameHeader): number;
  /** A DATA frame's payload is in place. */
  data(h: FrameHeader): void;
  /** The server refused one request (the connection stays); `wireCode`: the ERROR frame's code (ErrorCode in protocol.ts). */
  requestError(id: number, message: string, wireCode: number): void;
  /** The connection is gone; called once, after the channel closed itself. */
  lost(reason: string, kind: LostKind): void;
}

type State = "connecting" | "challenge" | "welcome" | "info" | "zero-map" | "ready" | "closed";

/** Bytes read per wake-up on the urgent connection (replies to faults: small). */
const READ_BUDGET = 256 * 1024;
/**
 * On the background connection: about one DATA frame (its receive, decrypt and install) per
 * wake-up, so a fault or an urgent reply waits at most one frame's work (the loop serves those
 * first in the next turn). The budget is checked between receives only: a frame is never cut.
 */
const BACKGROUND_READ_BUDGET = 64 * 1024;

export class ClientChannel {
  private state: State = "connecting";
  private fd = -1;
  private token = -1;
  private events = 0;
  private readonly reader: FrameReader;
  private readonly writer = new FrameWriter();
  private hello: Uint8Array | undefined;
  private transcript: Transcript | undefined;
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
    this.token = loop.add(fd, this.events, (ev) => this.onEvents(ev), role !== Role.BACKGROUND);
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
      const hello = { versionMin: PROTOCOL_VERSION, versionMax: PROTOCOL_VERSION, role: this.role, flags: this.wantZeroMap ? WANT_ZERO_MAP : 0, nonce: nonce() };
      this.hello = encodeHello(hello);
      this.send(frame(FrameType.HELLO, this.hello));
      return;
    }
    if (ev & EPOLLOUT && this.state !== "closed") this.flush();
    if (this.state === "closed" || !(ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    let r: number;
    const before = this.reader.received;
    try {
      r = this.reader.read(this.fd, this.role === Role.BACKGROUND ? BACKGROUND_READ_BUDGET : READ_BUDGET);
    } catch (e) {
      if (e instanceof SealError) {
        // Someone between us changed, replayed or cut the stream: none of it is used; drop the connection.
        return this.lose(`a frame from the page server failed authentication: ${e.message}`, "tampered");
      }
      if (!(e instanceof ProtocolError)) throw e;
      // Tell the server why (sealed, once the handshake is done), then drop the connection.
      this.writer.push(errorFrame(e.wireCode, e.message));
      this.writer.flush(this.fd);
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
      case "info":
        if (t === FrameType.INFO) return -1;
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
        if (h.id !== 0 && this.state === "ready") return this.owner.requestError(h.id, errorText(h.arg, text), h.arg);
        const kind: LostKind = h.arg === ErrorCode.AUTH_FAILED ? "auth" : h.arg === ErrorCode.VERSION ? "version" : "refused";
        return this.lose(`the page server refused us: ${text}`, kind);
      }
      case FrameType.CHALLENGE: {
        const c = decodeChallenge(own!);
        if (c.version !== PROTOCOL_VERSION) throw new ProtocolError(`the page server chose protocol version ${c.version}; we speak ${PROTOCOL_VERSION}`, ErrorCode.VERSION);
        this.transcript = { hello: this.hello!, challenge: own!.slice() };
        this.state = "welcome";
        this.send(frame(FrameType.AUTH, clientProof(this.secret, this.transcript)));
        return;
      }
      case FrameType.WELCOME: {
        const proof = decodeWelcome(own!);
        // Mutual: a server that does not hold the token must not feed pages to our VMs.
        if (!proofsEqual(proof, serverProof(this.secret, this.transcript!))) {
          throw new ProtocolError("the page server's proof does not match our token (is --token-file the same on both sides?)", ErrorCode.AUTH_FAILED);
        }
        // The last frame in clear: both directions are sealed from the next frame on.
        const keys = sessionKeys(this.secret, this.transcript!);
        this.reader.seal(new ReceiveSeal(keys.serverToClient));
        this.writer.seal(new SendSeal(keys.clientToServer));
        keys.clientToServer.fill(0);
        keys.serverToClient.fill(0);
        this.state = "info";
        return;
      }
      case FrameType.INFO: {
        const { info } = decodeInfo(own!);
        this.info = info;
        if (this.wantZeroMap) {
          this.zeroBits = new Uint8Array(Math.ceil(info.pages / 8));
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
