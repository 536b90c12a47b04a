// Frame I/O over a non-blocking C socket registered in our EventLoop (never Bun's sockets: Bun's
// loop runs only between our loop's yields). The reader takes exactly a header, then exactly the
// payload, straight to where its owner wants it; the writer sends queued bytes and raw memory
// (sealed page payloads from one send buffer) and remembers where a short send stopped. Both
// switch to sealed frames (seal.ts) once the handshake is done, at a frame boundary.
import type { Pointer } from "bun:ffi";
import { Errno, sl } from "../core/ffi.ts";
import { decodeHeader, FrameHeader, HEADER_SIZE, ProtocolError } from "./protocol.ts";
import { type ReceiveSeal, SEALED_HEADER_SIZE, type SendSeal } from "./seal.ts";

export interface FrameSink {
  /**
   * A header arrived (already checked against the per-type size limits). Returns the address its
   * payload goes to, or -1 for the reader's own buffer (small control payloads). Throws
   * ProtocolError to refuse the frame.
   */
  target(h: FrameHeader): number;
  /** A whole frame arrived. `own` views the payload when it went to the reader's buffer. */
  frame(h: FrameHeader, own: Uint8Array | null): void;
}

/** read() results besides -errno. */
export const READ_AGAIN = 0; // the socket is empty
export const READ_MORE = 1; // budget used up; call again
export const READ_EOF = 2; // the peer closed
export const READ_STOPPED = 3; // the owner stopped the reader from a callback

/** The reader's own buffer: a (sealed) header, then small payloads. */
const OWN_PAYLOAD_AT = SEALED_HEADER_SIZE;

export class FrameReader {
  readonly header = new FrameHeader();
  /** A plain JS buffer, not a mapping: a connection that never authenticates costs no mmap. */
  private readonly buf: Uint8Array;
  private readonly hdrView: DataView;
  private sealed: ReceiveSeal | undefined;
  private hdrSize = HEADER_SIZE;
  private hdrFill = 0;
  private inPayload = false;
  private payAddr = 0;
  private payFill = 0;
  private own = false;
  private stopped = false;
  /** Bytes received so far (liveness checks). */
  received = 0;

  constructor(private readonly sink: FrameSink, controlCapacity = 4096 - OWN_PAYLOAD_AT) {
    this.buf = new Uint8Array(OWN_PAYLOAD_AT + controlCapacity);
    this.hdrView = new DataView(this.buf.buffer, 0, HEADER_SIZE);
  }

  /** Every frame from the next one on is sealed. Call between frames (e.g. from `frame`). The reader owns `seal` now. */
  seal(seal: ReceiveSeal): void {
    this.sealed = seal;
    this.hdrSize = SEALED_HEADER_SIZE;
  }

  /** True between frames (nothing partial buffered). */
  get idle(): boolean {
    return this.hdrFill === 0 && !this.inPayload;
  }

  /** Reads frames until the socket is empty or about `budget` bytes were taken. Throws ProtocolError. */
  read(fd: number, budget: number): number {
    // A budget of 0 would return READ_MORE forever without reading: callers loop on READ_MORE.
    if (!(budget > 0)) throw new RangeError(`FrameReader.read: budget ${budget} must be > 0`);
    let used = 0;
    while (!this.stopped) {
      if (used >= budget) return READ_MORE;
      if (!this.inPayload) {
        const n = sl.sl_recv(fd, this.buf.subarray(this.hdrFill, this.hdrSize), this.hdrSize - this.hdrFill);
        if (n <= 0) return this.status(n);
        this.received += n;
        used += n;
        this.hdrFill += n;
        if (this.hdrFill < this.hdrSize) continue;
        this.sealed?.openHeader(this.buf.subarray(0, SEALED_HEADER_SIZE));
        const h = decodeHeader(this.hdrView, 0, this.header);
        const addr = this.sink.target(h);
        if (this.stopped) return READ_STOPPED;
        this.own = addr < 0;
        if (this.own && h.length > this.buf.length - OWN_PAYLOAD_AT) throw new ProtocolError(`frame of ${h.length} bytes where at most ${this.buf.length - OWN_PAYLOAD_AT} fit`);
        this.payAddr = addr;
        this.payFill = 0;
        this.inPayload = true;
      }
      const h = this.header;
      if (this.payFill < h.length) {
        const n = this.own
          ? sl.sl_recv(fd, this.buf.subarray(OWN_PAYLOAD_AT + this.payFill, OWN_PAYLOAD_AT + h.length), h.length - this.payFill)
          : sl.sl_recv(fd, (this.payAddr + this.payFill) as Pointer, h.length - this.payFill);
        if (n <= 0) return this.status(n);
        this.received += n;
        used += n;
        this.payFill += n;
        if (this.payFill < h.length) continue;
      }
      this.inPayload = false;
      this.hdrFill = 0;
      const own = this.own ? this.buf.subarray(OWN_PAYLOAD_AT, OWN_PAYLOAD_AT + h.length) : null;
      if (this.sealed !== undefined) {
        // Decrypted where it landed; a payload that fails its tag throws before anyone sees it.
        if (h.length > 0) this.sealed.openPayload(own ?? this.payAddr, h.length);
        this.sealed.next();
      }
      this.sink.frame(h, own);
    }
    return READ_STOPPED;
  }

  private status(n: number): number {
    if (n === 0) return READ_EOF;
    if (-n === Errno.EAGAIN) return READ_AGAIN;
    return n;
  }

  /** No more callbacks after this; frees the key. Safe to call from a callback. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.sealed?.free();
  }
}

type Segment = { bytes: Uint8Array; addr: 0; len: number } | { bytes: null; addr: number; len: number };

/** Coalesce queued control frames into one send up to this many bytes. */
const COALESCE = 16 * 1024;

export const SENT_ALL = 0;
export const SEND_BLOCKED = 1;

export class FrameWriter {
  private readonly q: Segment[] = [];
  private head = 0;
  private pos = 0;
  private sealed: SendSeal | undefined;
  /** Bytes queued and not yet sent. */
  pending = 0;

  get empty(): boolean {
    return this.pending === 0;
  }

  /** Every frame pushed from now on is sealed. The writer owns `seal` now. */
  seal(seal: SendSeal): void {
    this.sealed = seal;
  }

  /** Queues a whole frame (header and payload), sealed once the handshake is done. */
  push(frameBytes: Uint8Array): void {
    this.pushBytes(this.sealed !== undefined ? this.sealed.frame(frameBytes) : frameBytes);
  }

  /**
   * Queues a sealed frame whose `len`-byte payload at `src` is encrypted into `dst`, which the
   * caller owns and leaves alone until the writer is empty again.
   */
  pushSealed(header: Uint8Array, src: number, dst: number, len: number): void {
    if (this.sealed === undefined) throw new ProtocolError("a payload frame before the channel was sealed");
    this.pushBytes(this.sealed.data(header, src, dst, len));
    this.pushRaw(dst, len);
  }

  private pushBytes(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    this.q.push({ bytes, addr: 0, len: bytes.length });
    this.pending += bytes.length;
  }

  /** Queues memory we own (and keep alive and unchanged until it is sent): sent without a copy. */
  private pushRaw(addr: number, len: number): void {
    if (len === 0) return;
    this.q.push({ bytes: null, addr, len });
    this.pending += len;
  }

  /** Sends what it can. Returns SENT_ALL, SEND_BLOCKED, or -errno. */
  flush(fd: number): number {
    if (this.head > 1024) {
      this.q.splice(0, this.head);
      this.head = 0;
    }
    while (this.head < this.q.length) {
      let seg = this.q[this.head]!;
      if (seg.bytes !== null && this.pos === 0) seg = this.coalesce(seg);
      const n = seg.bytes !== null
        ? sl.sl_send(fd, seg.bytes.subarray(this.pos), seg.len - this.pos)
        : sl.sl_send(fd, (seg.addr + this.pos) as Pointer, seg.len - this.pos);
      if (n < 0) return -n === Errno.EAGAIN ? SEND_BLOCKED : n;
      this.pos += n;
      this.pending -= n;
      if (this.pos < seg.len) continue;
      this.pos = 0;
      this.head++;
    }
    this.q.length = 0;
    this.head = 0;
    return SENT_ALL;
  }

  // Several small control frames (requests, pings) leave in one send; they are headers, not pages.
  private coalesce(first: Segment & { bytes: Uint8Array }): Segment {
    let end = this.head + 1;
    let total = first.len;
    while (end < this.q.length) {
      const s = this.q[end]!;
      if (s.bytes === null || total + s.len > COALESCE) break;
      total += s.len;
      end++;
    }
    if (end === this.head + 1) return first;
    const joined = new Uint8Array(total);
    let at = 0;
    for (let i = this.head; i < end; i++) {
      const b = this.q[i]!.bytes!;
      joined.set(b, at);
      at += b.length;
    }
    const seg: Segment = { bytes: joined, addr: 0, len: total };
    this.q.splice(this.head, end - this.head, seg);
    return seg;
  }

  /** Drops what is queued and frees the key: the connection is closing. */
  clear(): void {
    this.q.length = 0;
    this.head = 0;
    this.pos = 0;
    this.pending = 0;
    this.sealed?.free();
    this.sealed = undefined;
  }
}
