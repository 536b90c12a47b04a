// `snapload page-server`: serves one image's pages over TCP to any number of snapload daemons
// (docs/postcopy-protocol.md). Single-threaded on our EventLoop; payloads are sent straight from
// the read-only image mapping. Urgent connections are answered as soon as their requests are
// read; background connections share one bounded slice per loop turn, taken after every ready
// fd was served, so a fault waits behind at most one slice of bulk transfer in this process.
//
// Unauthenticated connections are held to a budget (globally and per source address, a short
// deadline, the oldest idle one evicted when full) and cost no mapping; an authenticated one
// takes its send buffer from a bounded pool. Lines a stranger can cause at will are rate-limited.
import { BufferPool, type PooledBuffer } from "../core/buffer-pool.ts";
import { check } from "../core/check.ts";
import { EventLoop } from "../core/event-loop.ts";
import { cstr, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Errno, errnoName, sl } from "../core/ffi.ts";
import type { ZeroMap } from "../sources/image/snapshot-image.ts";
import { LogLimiter } from "../core/log-limit.ts";
import { contextFields, type EventName, type Fields, formatBytes, type Logger, type LogLevel } from "../core/log.ts";
import { SnaploadError } from "../core/errors.ts";
import { checkCrypto } from "./aead.ts";
import { clientProof, nonce, proofsEqual, serverProof, sessionKeys } from "./auth.ts";
import { deferAccept, peerAddress } from "./peer-address.ts";
import {
  decodeErrorText, decodeHello, encodeChallenge, encodeHeader, encodeInfo, encodeWelcome, ErrorCode, errorFrame, frame, FRAME_NAMES, FrameType,
  type FrameHeader, HEADER_SIZE, type ImageInfo, MAX_CHUNK, MAX_OUTSTANDING, MAX_ZERO_MAP_CHUNK, PROTOCOL_VERSION, ProtocolError, requestInBounds, Role,
  ROLE_NAMES, WANT_ZERO_MAP, WIRE_PAGE, zeroMapBytes,
} from "./protocol.ts";
import { ReceiveSeal, SEALED_HEADER_SIZE, SealError, SendSeal } from "./seal.ts";
import { FrameReader, type FrameSink, READ_AGAIN, READ_EOF, READ_MORE, SEND_BLOCKED, SENT_ALL, FrameWriter } from "./wire.ts";

/** The bytes a page server serves: what an opened image offers. */
export interface ServedImage {
  readonly size: number;
  readonly zero: ZeroMap;
  /** Address of image byte 0 (read-only mapping). Zero pages there are never read. Unused with `lazy`. */
  readonly base: number;
  /** Bytes that arrive later (a snapshot store): absent when every byte is at `base`. */
  readonly lazy?: LazyBytes;
}

/**
 * Image bytes that are not all in memory yet (chunks of a store). Only verified bytes are ever
 * located: a reply waits for its bytes, or is refused, never sent from anything else.
 */
export interface LazyBytes {
  /** A client asked for bytes [start, end): start getting them (urgent: a VM is waiting). */
  want(start: number, end: number, urgent: boolean): void;
  /** Address of the bytes at `at` and how many of the `len` that follow are there too (valid until the loop turns); undefined when they are not here yet. */
  locate(at: number, len: number): { addr: number; len: number } | undefined;
  /** Calls back once the bytes at `at` are here (or with why they cannot be had); may call back at once. `urgent` as for want(). */
  whenReady(at: number, urgent: boolean, cb: (err: Error | undefined) => void): void;
}

export interface PageServerOptions {
  host: string;
  port: number;
  image: ServedImage;
  /** Identity of the served file: a reconnecting client refuses a different one. */
  imageId: Uint8Array;
  /** The image is a snapshot file served whole (for qemu-restore), said so in INFO. */
  wholeFile?: boolean;
  token: Buffer;
  logger: Logger;
  /** A client that has not authenticated by then is dropped. */
  handshakeTimeoutMs: number;
  /** Unauthenticated connections held at once, and from one source address; past either, the oldest idle one goes. */
  maxPreauth: number;
  maxPreauthPerAddress: number;
  /** Authenticated connections at once (each holds a send buffer from the pool); more are refused. */
  maxClients: number;
  /** Fault injection, for tests (test/fixtures/faulty-page-server.ts); the product never passes one. */
  faults?: PageServerFaults;
}

/** Hooks a test uses to make a real page server misbehave in one precise way. */
export interface PageServerFaults {
  /** Called while accepted connection `client` is set up; a throw fails that setup (the connection is dropped, the server goes on). */
  accepting?(client: number): void;
  /** Sees each sealed DATA payload of connection `client` (bytes [0, len)) before it leaves; may change it in transit. */
  sealed?(client: number, bytes: Uint8Array, len: number): void;
}


/** Bytes read from one connection per wake-up before others get a turn. */
const READ_BUDGET = 64 * 1024;
/** Bytes of background payload sent per idle turn of the loop, over all connections. */
const BACKGROUND_STEP_BYTES = 256 * 1024;
/** A connection that refused us or was refused gets this long to take our last frame. */
const LINGER_MS = 1000;
/** Control replies (PONG, refusals) a client leaves unread past this: it is dropped, not buffered without bound. */
const MAX_UNREAD_REPLY_BYTES = 1024 * 1024;
/** accept() failed (out of fds): the listener stays readable, so it is not watched for this long. */
const ACCEPT_PAUSE_MS = 100;
/**
 * The kernel's accept queue (capped by net.core.somaxconn). Deep, so a flood of connects waits
 * in it (and is accepted and evicted in turn) rather than overflowing it: an overflowing queue
 * drops a legitimate client's SYN, which then waits a whole retransmission timeout (1 s).
 */
const LISTEN_BACKLOG = 4096;
/** Connections accepted per wake-up: a flood of connects cannot keep the loop from the clients it has. */
const ACCEPTS_PER_TURN = 64;
const EVICTED_FRAME = errorFrame(ErrorCode.OVERLOADED, "too many unauthenticated connections; evicted");
/** Idle-looking connections read once before one is evicted (their HELLO may be queued). */
const EVICTION_POKES = 8;
/** Control payloads a client may send (ERROR text is the largest). */
const CONTROL_CAPACITY = 1024;

interface Job {
  id: number;
  /** Image byte range [start, end); `pos` is the next byte to send. */
  start: number;
  end: number;
  pos: number;
}

type ConnState = "hello" | "auth" | "ready" | "closing" | "closed";

class Conn {
  token = -1;
  role: Role = Role.PROBE;
  state: ConnState = "hello";
  readonly reader: FrameReader;
  readonly writer = new FrameWriter();
  readonly jobs: Job[] = [];
  jobHead = 0;
  wantZeroMap = false;
  hello: Uint8Array | undefined;
  challenge: Uint8Array | undefined;
  /** Still counted against the pre-authentication budget. */
  preauth = true;
  authenticated = false;
  /** Where sealed DATA payloads are encrypted to; from the pool, once authenticated. */
  sendBuf: PooledBuffer | undefined;
  cancelTimer: () => void = () => {};
  /** Waiting for EPOLLOUT: the kernel's send buffer is full. */
  blocked = false;
  queuedForBackground = false;
  /** Its oldest request waits for lazy bytes: nothing is sent until they are here. */
  waiting = false;
  requests = 0;
  bytesSent = 0;

  constructor(readonly n: number, readonly fd: number, readonly peer: string, sink: FrameSink) {
    this.reader = new FrameReader(sink, CONTROL_CAPACITY);
  }

  /** Nothing received yet (or already refused): the first to go when the pre-authentication budget is full. */
  get idle(): boolean {
    return (this.state === "hello" && this.reader.received === 0) || this.state === "closing";
  }

  get outstanding(): number {
    return this.jobs.length - this.jobHead;
  }

  get name(): string {
    return this.authenticated ? `client #${this.n} (${ROLE_NAMES[this.role]})` : `client #${this.n} from ${this.peer}`;
  }
}

export class PageServer {
  readonly loop: EventLoop;
  port = 0;
  private lfd = -1;
  private ltoken = -1;
  private nextConn = 1;
  private readonly conns = new Set<Conn>();
  /** For the metrics: clients accepted, and what closed connections counted. */
  private readonly totals = { clients: 0, requests: 0, bytes: 0 };
  /** Error frames sent, by wire error code. */
  private readonly errors = new Float64Array(Math.max(...Object.values(ErrorCode)) + 1);
  /** Background connections with work and room to send, in turn order. */
  private readonly backgroundQueue: Conn[] = [];
  private backgroundOn = false;
  private readonly background = () => this.backgroundStep();
  private readonly info: ImageInfo;
  private readonly zeroBits: Uint8Array;
  private closed = false;
  /** Unauthenticated connections, oldest first (Sets keep insertion order), and per source address. */
  private readonly preauth = new Set<Conn>();
  private readonly preauthByPeer = new Map<string, Set<Conn>>();
  private readonly sendBufs: BufferPool;
  private readonly limited: LogLimiter;
  readonly counters = { accepted: 0, evicted: 0, preauthTimeouts: 0, authenticated: 0, acceptErrors: 0, tampered: 0 };

  constructor(private readonly opts: PageServerOptions, loop?: EventLoop) {
    checkCrypto();
    this.loop = loop ?? new EventLoop();
    this.sendBufs = new BufferPool(MAX_CHUNK, opts.maxClients);
    this.limited = new LogLimiter(opts.logger);
    const zero = opts.image.zero;
    const zeroPages = zero.countZero();
    this.info = { size: opts.image.size, pages: zero.pages, dataPages: zero.pages - zeroPages, id: opts.imageId, ...(opts.wholeFile ? { wholeFile: true } : {}) };
    this.zeroBits = zeroMapBytes(zero);
  }

  /** Binds and listens; returns the port (useful with port 0). */
  listen(): number {
    this.lfd = check("listen", sl.sl_tcp_listen(cstr(this.opts.host), this.opts.port, LISTEN_BACKLOG), { host: this.opts.host, port: this.opts.port });
    this.port = check("getsockname", sl.sl_local_port(this.lfd));
    // Half the handshake timeout (at least the kernel's 1 s): a silent client is handed over while it still has time to speak.
    if (!deferAccept(this.lfd, Math.max(1, Math.floor(this.opts.handshakeTimeoutMs / 2000)))) this.opts.logger.warn("page_server.defer_accept_refused", "TCP_DEFER_ACCEPT refused; idle connections will be accepted (and evicted) as they come");
    this.ltoken = this.loop.add(this.lfd, EPOLLIN, () => this.acceptAll());
    return this.port;
  }

  async run(): Promise<void> {
    await this.loop.run();
  }

  get connections(): number {
    return this.conns.size;
  }

  /** Counters for the metrics endpoint: closed connections' totals plus the live ones. */
  metrics(): { clients: number; clientsTotal: number; requests: number; bytes: number; errors: Readonly<Record<string, number>> } {
    let requests = this.totals.requests;
    let bytes = this.totals.bytes;
    for (const c of this.conns) {
      requests += c.requests;
      bytes += c.bytesSent;
    }
    const errors: Record<string, number> = {};
    for (const [name, code] of Object.entries(ErrorCode)) errors[name.toLowerCase()] = this.errors[code]!;
    return { clients: this.conns.size, clientsTotal: this.totals.clients, requests, bytes, errors };
  }

  private acceptAll(): void {
    for (let n = 0; n < ACCEPTS_PER_TURN; n++) {
      const fd = sl.sl_accept(this.lfd);
      if (fd < 0) {
        if (-fd !== Errno.EAGAIN) {
          // EMFILE/ENFILE leave the connection queued and the listener readable: pause, do not spin.
          this.limited.log("accept failure", "warn", "page_server.accept_failed", `accept failed: ${errnoName(-fd)}; not accepting for ${ACCEPT_PAUSE_MS} ms`, { errno: errnoName(-fd), pauseMs: ACCEPT_PAUSE_MS });
          this.loop.pause(this.ltoken, this.lfd, EPOLLIN, ACCEPT_PAUSE_MS);
        }
        return;
      }
      // Whatever goes wrong with one connection ends that connection (admit closed it), never the server.
      try {
        this.admit(fd);
      } catch (e) {
        this.counters.acceptErrors++;
        this.limited.log("accept error", "error", "page_server.accept_failed", `setting up an accepted connection failed: ${(e as Error).message}; connection dropped`, { reason: (e as Error).message });
      }
    }
    // More may be queued: the listener is level-triggered, so the loop comes back after the others had their turn.
  }

  /** Sets up an accepted fd; on failure the fd is closed and the error thrown. */
  private admit(fd: number): void {
    let peer: string;
    try {
      peer = peerAddress(fd);
      this.makeRoom(peer);
    } catch (e) {
      sl.sl_close(fd);
      throw e;
    }
    const sink: FrameSink = {
      target: (h) => this.target(conn, h),
      frame: (h, own) => this.onFrame(conn, h, own!),
    };
    const conn = new Conn(this.nextConn++, fd, peer, sink);
    this.conns.add(conn);
    this.preauth.add(conn);
    this.counters.accepted++;
    try {
      let mine = this.preauthByPeer.get(peer);
      if (mine === undefined) this.preauthByPeer.set(peer, (mine = new Set()));
      mine.add(conn);
      conn.token = this.loop.add(fd, EPOLLIN | EPOLLRDHUP, (ev) => this.onEvents(conn, ev));
      conn.cancelTimer = this.loop.after(this.opts.handshakeTimeoutMs, () => {
        this.counters.preauthTimeouts++;
        this.refuse(conn, ErrorCode.TIMEOUT, `no authentication within ${this.opts.handshakeTimeoutMs} ms`);
      });
      this.opts.faults?.accepting?.(conn.n);
    } catch (e) {
      this.closeConn(conn, "dropped", "debug");
      throw e;
    }
    this.totals.clients++;
    this.opts.logger.debug("page_server.client_connected", `${conn.name} connected`, { client: conn.name, peer });
  }

  /** Keeps the unauthenticated budget: evicts the oldest idle connection (else the oldest) where it is full. */
  private makeRoom(peer: string): void {
    const mine = this.preauthByPeer.get(peer);
    if (mine !== undefined && mine.size >= this.opts.maxPreauthPerAddress) this.evict(mine, this.opts.maxPreauthPerAddress, peer);
    if (this.preauth.size >= this.opts.maxPreauth) this.evict(this.preauth, this.opts.maxPreauth);
  }

  /** `from` is at `limit`: the connections from `address`, or (without one) all unauthenticated ones. */
  private evict(from: Set<Conn>, limit: number, address?: string): void {
    const size = from.size;
    let victim: Conn | undefined;
    let pokes = 0;
    for (const c of from) {
      if (c.idle && c.state === "hello" && pokes < EVICTION_POKES) {
        // Its HELLO may be waiting in the socket, unread: a client that spoke is not idle.
        pokes++;
        this.readFrames(c);
        if (from.size < size) return; // it closed or was closed: room made
      }
      if (c.idle) {
        victim = c;
        break;
      }
      victim ??= c;
    }
    if (victim === undefined) return;
    this.counters.evicted++;
    // One best-effort frame, no linger: the point is to free the fd now.
    sl.sl_send(victim.fd, EVICTED_FRAME, EVICTED_FRAME.length);
    this.closeConn(victim, `evicted: unauthenticated connections at their limit (${limit}${address !== undefined ? ` from ${address}` : ""})`, "warn", {
      cause: "evicted", limit, limitAddress: address,
    });
  }

  private forgetPreauth(conn: Conn): void {
    if (!conn.preauth) return;
    conn.preauth = false;
    this.preauth.delete(conn);
    const mine = this.preauthByPeer.get(conn.peer);
    if (mine !== undefined) {
      mine.delete(conn);
      if (mine.size === 0) this.preauthByPeer.delete(conn.peer);
    }
  }

  private onEvents(conn: Conn, ev: number): void {
    if (ev & EPOLLOUT && conn.blocked) {
      conn.blocked = false;
      this.loop.modify(conn.token, conn.fd, EPOLLIN | EPOLLRDHUP);
      if (conn.state === "closing") return this.lingerFlush(conn);
      if (!this.flush(conn)) return;
      if (conn.role === Role.BACKGROUND) this.queueBackground(conn);
      else this.pump(conn, Number.POSITIVE_INFINITY);
    }
    if (conn.state === "closing" && ev & (EPOLLHUP | EPOLLERR)) return this.closeConn(conn, "refused", "debug");
    if (conn.state === "closed" || conn.state === "closing") return;
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) this.readFrames(conn);
  }

  private readFrames(conn: Conn): void {
    let r: number;
    try {
      r = conn.reader.read(conn.fd, READ_BUDGET);
    } catch (e) {
      if (e instanceof SealError) {
        // Nothing of it is used; a relay that changes one byte ends the connection, nothing more.
        this.counters.tampered++;
        return this.closeConn(conn, `sent a frame that failed authentication: ${e.message}; connection dropped`, "warn", { cause: "tampered" });
      }
      if (e instanceof ProtocolError) return this.refuse(conn, e.wireCode, e.message);
      throw e;
    }
    if (r === READ_EOF) {
      const partial = conn.reader.idle ? "" : " in the middle of a frame";
      return this.closeConn(conn, `closed the connection${partial}`, conn.state === "ready" ? "debug" : "warn");
    }
    // A client that closes with replies still coming (its VM detached) resets: routine once authenticated.
    if (r < 0) return this.closeConn(conn, `connection failed: ${errnoName(-r)}`, conn.state === "ready" ? "debug" : "warn");
    if (r !== READ_AGAIN && r !== READ_MORE) return;
    // Control replies (PONG, refused requests) go out now, whatever the role.
    if (!conn.writer.empty && !this.flush(conn)) return;
    // Requests read in this turn: an urgent connection is answered right away.
    if (conn.state === "ready" && conn.outstanding > 0) {
      if (conn.role === Role.BACKGROUND) this.queueBackground(conn);
      else this.pump(conn, Number.POSITIVE_INFINITY);
    }
  }

  /** Which frames each state accepts; every payload is small and goes to the reader's buffer. */
  private target(conn: Conn, h: FrameHeader): number {
    const t = h.type;
    const ok =
      conn.state === "hello" ? t === FrameType.HELLO
      : conn.state === "auth" ? t === FrameType.AUTH || t === FrameType.ERROR
      : conn.state === "ready" ? t === FrameType.REQUEST || t === FrameType.PING || t === FrameType.ERROR
      : false;
    if (!ok) throw new ProtocolError(`unexpected ${FRAME_NAMES[t]} frame ${conn.state === "hello" ? "before HELLO" : `in state ${conn.state}`}`);
    return -1;
  }

  private onFrame(conn: Conn, h: FrameHeader, payload: Uint8Array): void {
    switch (h.type) {
      case FrameType.HELLO:
        return this.onHello(conn, payload);
      case FrameType.AUTH:
        return this.onAuth(conn, payload);
      case FrameType.REQUEST:
        return this.onRequest(conn, h);
      case FrameType.PING:
        this.checkUnread(conn);
        conn.writer.push(frame(FrameType.PONG, null, h.id));
        this.flush(conn);
        return;
      case FrameType.ERROR:
        return this.closeConn(conn, `reported an error and closed: ${decodeErrorText(payload)}`, "warn");
    }
  }

  private onHello(conn: Conn, payload: Uint8Array): void {
    const hello = decodeHello(payload);
    if (PROTOCOL_VERSION < hello.versionMin || PROTOCOL_VERSION > hello.versionMax) {
      return this.refuse(conn, ErrorCode.VERSION, `client speaks protocol versions ${hello.versionMin}-${hello.versionMax}; this server speaks ${PROTOCOL_VERSION}`);
    }
    conn.role = hello.role;
    conn.hello = payload.slice();
    conn.challenge = encodeChallenge(PROTOCOL_VERSION, nonce());
    conn.state = "auth";
    conn.wantZeroMap = (hello.flags & WANT_ZERO_MAP) !== 0;
    conn.writer.push(frame(FrameType.CHALLENGE, conn.challenge));
    this.flush(conn);
  }

  private onAuth(conn: Conn, proof: Uint8Array): void {
    const transcript = { hello: conn.hello!, challenge: conn.challenge! };
    if (!proofsEqual(proof, clientProof(this.opts.token, transcript))) {
      return this.refuse(conn, ErrorCode.AUTH_FAILED, "authentication failed: the client's proof does not match our token (is --token-file the same on both sides?)");
    }
    // Per-connection memory only now, and from a bounded pool.
    const buf = this.sendBufs.take();
    if (buf === undefined) return this.refuse(conn, ErrorCode.OVERLOADED, `too many clients (at most ${this.sendBufs.max} authenticated connections)`);
    conn.sendBuf = buf;
    conn.cancelTimer();
    this.forgetPreauth(conn);
    conn.state = "ready";
    conn.authenticated = true;
    this.counters.authenticated++;
    // WELCOME is the last frame in clear; both directions are sealed from the next frame on.
    conn.writer.push(frame(FrameType.WELCOME, encodeWelcome(serverProof(this.opts.token, transcript))));
    const keys = sessionKeys(this.opts.token, transcript);
    conn.writer.seal(new SendSeal(keys.serverToClient));
    conn.reader.seal(new ReceiveSeal(keys.clientToServer));
    keys.clientToServer.fill(0);
    keys.serverToClient.fill(0);
    conn.writer.push(frame(FrameType.INFO, encodeInfo(this.info)));
    if (conn.wantZeroMap) {
      for (let at = 0; at < this.zeroBits.length; at += MAX_ZERO_MAP_CHUNK) {
        conn.writer.push(frame(FrameType.ZERO_MAP, this.zeroBits.subarray(at, Math.min(this.zeroBits.length, at + MAX_ZERO_MAP_CHUNK)), 0, at));
      }
    }
    this.opts.logger.info("page_server.client_authenticated", `${conn.name} from ${conn.peer} authenticated`, { client: conn.name, peer: conn.peer, role: ROLE_NAMES[conn.role] });
    this.flush(conn);
  }

  private onRequest(conn: Conn, h: FrameHeader): void {
    const size = h.arg;
    const start = h.offset;
    // The last page may run past the end of an image that is not a whole number of pages (a
    // file served whole): its tail reads as zero, as the mapping gives it.
    const inBounds = requestInBounds(h.id, start, size, this.info.pages * WIRE_PAGE);
    conn.requests++;
    // Bounds: never read outside the image, whatever the client asks.
    if (!inBounds) {
      this.checkUnread(conn);
      this.opts.logger.warn("page_server.request_refused", `${conn.name}: request ${h.id} for bytes [${start}, ${start + size}) lies outside the ${this.info.size}-byte image; refused`, {
        client: conn.name, request: h.id, start, size, imageSize: this.info.size,
      });
      this.errors[ErrorCode.OUT_OF_BOUNDS]!++;
      conn.writer.push(errorFrame(ErrorCode.OUT_OF_BOUNDS, `bytes [${start}, ${start + size}) lie outside the ${this.info.size}-byte image`, h.id));
      return;
    }
    if (conn.outstanding >= MAX_OUTSTANDING) throw new ProtocolError(`more than ${MAX_OUTSTANDING} requests outstanding`, ErrorCode.OVERLOADED);
    conn.jobs.push({ id: h.id, start, end: start + size, pos: start });
    this.opts.image.lazy?.want(start, start + size, conn.role !== Role.BACKGROUND);
  }

  /** A client that keeps asking for replies but does not read them. Throws ProtocolError. */
  private checkUnread(conn: Conn): void {
    if (conn.writer.pending > MAX_UNREAD_REPLY_BYTES) throw new ProtocolError(`more than ${formatBytes(MAX_UNREAD_REPLY_BYTES)} of replies left unread`, ErrorCode.OVERLOADED);
  }

  /**
   * Sends chunks of the connection's requests, oldest first, until `budget` bytes went out,
   * the socket is full, or nothing is left. Returns true while work remains and the socket has room.
   */
  private pump(conn: Conn, budget: number): boolean {
    const zero = this.opts.image.zero;
    const lazy = this.opts.image.lazy;
    while (budget > 0) {
      if (conn.waiting) return false;
      if (!conn.writer.empty && !this.flush(conn)) return false;
      if (conn.jobHead >= conn.jobs.length) {
        conn.jobs.length = 0;
        conn.jobHead = 0;
        return false;
      }
      const job = conn.jobs[conn.jobHead]!;
      const endPage = job.end / WIRE_PAGE;
      // Zero pages never cross the wire: the client knows them from the zero map.
      const first = zero.nextData(job.pos / WIRE_PAGE, endPage);
      if (first >= endPage) {
        conn.jobHead++;
        continue;
      }
      const last = zero.nextZero(first, Math.min(endPage, first + MAX_CHUNK / WIRE_PAGE));
      let len = (last - first) * WIRE_PAGE;
      const at = first * WIRE_PAGE;
      let src = this.opts.image.base + at;
      if (lazy !== undefined) {
        const here = lazy.locate(at, len);
        if (here === undefined) {
          if (this.wait(conn, job, lazy, at)) continue;
          return false;
        }
        src = here.addr;
        len = here.len;
      }
      job.pos = at + len;
      this.sendChunk(conn, job, at, len, src);
      budget -= len;
    }
    return this.flush(conn) && conn.outstanding > 0;
  }

  /**
   * The connection's oldest request needs bytes that are not here: it waits (later requests
   * behind it) and is resumed when they come. Returns true when they came at once.
   */
  private wait(conn: Conn, job: Job, lazy: LazyBytes, at: number): boolean {
    let inline = true;
    let failure: Error | undefined;
    let came = false;
    conn.waiting = true;
    // A background connection's wait does not hurry its chunk past other VMs' faults.
    lazy.whenReady(at, conn.role !== Role.BACKGROUND, (err) => {
      conn.waiting = false;
      if (inline) {
        came = true;
        failure = err;
        return;
      }
      if (conn.state !== "ready") return;
      if (err !== undefined) this.unavailable(conn, job, at, err);
      if (conn.role === Role.BACKGROUND) this.queueBackground(conn);
      else this.pump(conn, Number.POSITIVE_INFINITY);
    });
    inline = false;
    if (came && failure !== undefined) this.unavailable(conn, job, at, failure);
    return came;
  }

  /** The bytes of a request cannot be had (a chunk missing or corrupt in the store, the store down): the request is refused, the connection goes on. */
  private unavailable(conn: Conn, job: Job, at: number, err: Error): void {
    if (conn.jobs[conn.jobHead] === job) conn.jobHead++;
    this.errors[ErrorCode.UNAVAILABLE]!++;
    this.opts.logger.warn("page_server.bytes_unavailable", `${conn.name}: request ${job.id}: image bytes at 0x${at.toString(16)} cannot be had: ${err.message}; request refused`, {
      ...(err instanceof SnaploadError ? { ...contextFields(err.context), code: err.code } : {}), client: conn.name, request: job.id, at, reason: err.message,
    });
    conn.writer.push(errorFrame(ErrorCode.UNAVAILABLE, `image bytes at 0x${at.toString(16)}: ${err.message}`, job.id));
  }

  private sendChunk(conn: Conn, job: Job, at: number, len: number, src: number): void {
    const header = this.dataHeader;
    encodeHeader(new DataView(header.buffer), 0, FrameType.DATA, len, job.id, at - job.start, 0);
    // Encrypted straight from the image mapping into the connection's send buffer, which pump()
    // reuses only once the writer is empty. Header and payload leave as two sends: the
    // listener's TCP_NODELAY (inherited by accepted sockets) keeps the payload from waiting for
    // the header's ACK (~40 ms of delayed ACK).
    const buf = conn.sendBuf!;
    conn.writer.pushSealed(header, src, buf.address, len);
    this.opts.faults?.sealed?.(conn.n, buf.bytes, len);
    conn.bytesSent += len + SEALED_HEADER_SIZE;
  }

  private readonly dataHeader = new Uint8Array(HEADER_SIZE);

  /** Returns true when everything queued went out. */
  private flush(conn: Conn): boolean {
    if (conn.state === "closed") return false;
    const r = conn.writer.flush(conn.fd);
    if (r === SENT_ALL) return true;
    if (r === SEND_BLOCKED) {
      if (!conn.blocked) {
        conn.blocked = true;
        this.loop.modify(conn.token, conn.fd, EPOLLIN | EPOLLRDHUP | EPOLLOUT);
      }
      return false;
    }
    this.closeConn(conn, `send failed: ${errnoName(-r)}`, conn.preauth ? "warn" : "debug");
    return false;
  }

  private queueBackground(conn: Conn): void {
    if (conn.queuedForBackground || conn.blocked || conn.state !== "ready") return;
    conn.queuedForBackground = true;
    this.backgroundQueue.push(conn);
    if (!this.backgroundOn) {
      this.backgroundOn = true;
      this.loop.addBackground(this.background);
    }
  }

  /** One slice per loop turn, after the ready fds: a chunk per background connection, in turn, within a byte budget. */
  private backgroundStep(): boolean {
    let budget = BACKGROUND_STEP_BYTES;
    let turns = this.backgroundQueue.length;
    while (turns-- > 0 && budget > 0) {
      const conn = this.backgroundQueue.shift()!;
      conn.queuedForBackground = false;
      if (conn.state !== "ready") continue;
      const before = conn.bytesSent;
      if (this.pump(conn, MAX_CHUNK)) {
        conn.queuedForBackground = true;
        this.backgroundQueue.push(conn);
      }
      budget -= conn.bytesSent - before;
    }
    if (this.backgroundQueue.length === 0) {
      this.loop.removeBackground(this.background);
      this.backgroundOn = false;
      return false;
    }
    return true;
  }

  /** Sends an ERROR frame, logs why, and closes once it is out (or after LINGER_MS). */
  private refuse(conn: Conn, code: ErrorCode, message: string): void {
    if (conn.state === "closing" || conn.state === "closed") return;
    this.errors[code]!++;
    this.log(conn, conn.preauth, "warn", "page_server.client_refused", `${conn.name}: ${message}; connection closed`, { client: conn.name, peer: conn.peer, code, reason: message });
    conn.cancelTimer();
    conn.reader.stop();
    conn.jobs.length = 0;
    conn.jobHead = 0;
    conn.writer.push(errorFrame(code, message));
    conn.state = "closing";
    conn.cancelTimer = this.loop.after(LINGER_MS, () => this.closeConn(conn, "did not take our last frame", "debug"));
    this.lingerFlush(conn);
  }

  private lingerFlush(conn: Conn): void {
    const r = conn.writer.flush(conn.fd);
    if (r === SEND_BLOCKED) {
      conn.blocked = true;
      this.loop.modify(conn.token, conn.fd, EPOLLOUT);
      return;
    }
    this.closeConn(conn, "refused", "debug");
  }

  private closeConn(conn: Conn, reason: string, level: LogLevel, extra: Fields = {}): void {
    if (conn.state === "closed") return;
    conn.state = "closed";
    conn.cancelTimer();
    if (conn.token >= 0) this.loop.remove(conn.token, conn.fd);
    sl.sl_close(conn.fd);
    conn.reader.stop();
    conn.writer.clear();
    if (conn.sendBuf !== undefined) this.sendBufs.give(conn.sendBuf);
    conn.sendBuf = undefined;
    this.conns.delete(conn);
    const wasPreauth = conn.preauth;
    this.forgetPreauth(conn);
    const i = this.backgroundQueue.indexOf(conn);
    if (i >= 0) this.backgroundQueue.splice(i, 1);
    this.totals.requests += conn.requests;
    this.totals.bytes += conn.bytesSent;
    const line = wasPreauth ? `${conn.name} ${reason}` : `${conn.name} ${reason} (${conn.requests} requests, ${formatBytes(conn.bytesSent)} sent)`;
    this.log(conn, wasPreauth, level, "page_server.client_closed", line, { client: conn.name, peer: conn.peer, reason, ...extra, requests: conn.requests, bytes: conn.bytesSent });
  }

  /** Lines about connections that have not authenticated are rate-limited: anyone can cause them. */
  private log(conn: Conn, preauth: boolean, level: LogLevel, event: EventName, line: string, fields: Fields): void {
    if (preauth) this.limited.log("unauthenticated-connection", level, event, line, fields);
    else this.opts.logger.log(level, event, line, fields);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.loop.stop();
    for (const conn of [...this.conns]) this.closeConn(conn, "dropped: page server shutting down", "debug");
    if (this.lfd >= 0) {
      this.loop.remove(this.ltoken, this.lfd);
      sl.sl_close(this.lfd);
      this.lfd = -1;
    }
    this.sendBufs.close();
    this.limited.flush();
    const c = this.counters;
    this.opts.logger.info(
      "page_server.closed",
      `page server: ${c.accepted} connections accepted, ${c.authenticated} authenticated, ${c.evicted} evicted unauthenticated, ` +
        `${c.preauthTimeouts} handshake timeouts, ${c.tampered} dropped for failing authentication, ${c.acceptErrors} accept errors`,
      { ...c },
    );
  }
}
