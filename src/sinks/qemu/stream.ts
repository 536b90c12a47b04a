// Encoders for the QEMU migration stream a postcopy source sends, and the decoder of the return
// path it reads (docs/qemu-postcopy-source.md §2–§5). Integers are big-endian.
import { SnaploadError } from "../../core/errors.ts";

export const TARGET_PAGE = 4096;

export const Cmd = {
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
} as const;

export const RamFlag = { ZERO: 0x02, MEM_SIZE: 0x04, PAGE: 0x08, EOS: 0x10, CONTINUE: 0x20 } as const;

const QEMU_VM_EOF = 0x00;
const SECTION_START = 0x01;
const SECTION_PART = 0x02;
const SECTION_END = 0x03;
const COMMAND = 0x08;
const FOOTER = 0x7e;
const RAM_SECTION_VERSION = 4;

export const Rp = { SHUT: 1, PONG: 2, REQ_PAGES_ID: 3, REQ_PAGES: 4 } as const;
const RP_MAX_LEN = 512;

/** A growable big-endian byte builder. */
export class Bytes {
  buf: Buffer;
  len = 0;

  constructor(capacity = 4096, reuse?: Buffer) {
    this.buf = reuse ?? Buffer.allocUnsafe(capacity);
  }

  #room(n: number): void {
    if (this.len + n <= this.buf.length) return;
    const grown = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.len + n));
    this.buf.copy(grown, 0, 0, this.len);
    this.buf = grown;
  }

  u8(v: number): this {
    this.#room(1);
    this.buf[this.len++] = v;
    return this;
  }

  be16(v: number): this {
    this.#room(2);
    this.buf.writeUInt16BE(v, this.len);
    this.len += 2;
    return this;
  }

  be32(v: number): this {
    this.#room(4);
    this.buf.writeUInt32BE(v >>> 0, this.len);
    this.len += 4;
    return this;
  }

  /** v is a safe integer (offsets and lengths): two 32-bit halves, no BigInt per page record. */
  be64(v: number): this {
    this.#room(8);
    this.buf.writeUInt32BE(Math.floor(v / 0x1_0000_0000), this.len);
    this.buf.writeUInt32BE(v >>> 0, this.len + 4);
    this.len += 8;
    return this;
  }

  bytes(b: Uint8Array): this {
    this.#room(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
    return this;
  }

  /** u8 length + bytes, no NUL. */
  counted(s: string): this {
    const b = Buffer.from(s, "utf8");
    if (b.length > 255) throw new SnaploadError("MIGRATION", `name too long for the migration stream (${b.length} bytes, at most 255): ${s}`, { name: s });
    return this.u8(b.length).bytes(b);
  }

  /** Room for `n` bytes at the end, returned as a view to fill (e.g. a page copy). */
  reserve(n: number): Buffer {
    this.#room(n);
    const v = this.buf.subarray(this.len, this.len + n);
    this.len += n;
    return v;
  }

  /** The bytes so far (a view; the builder must not be reused after this is handed off). */
  take(): Buffer {
    return this.buf.subarray(0, this.len);
  }
}

export function command(b: Bytes, cmd: number, payload: Uint8Array = new Uint8Array(0)): Bytes {
  return b.u8(COMMAND).be16(cmd).be16(payload.length).bytes(payload);
}

export function ping(b: Bytes, value: number): Bytes {
  return command(b, Cmd.PING, new Bytes(4).be32(value).take());
}

export function advise(b: Bytes, pageSizeSummary: number): Bytes {
  return command(b, Cmd.POSTCOPY_ADVISE, new Bytes(16).be64(pageSizeSummary).be64(TARGET_PAGE).take());
}

export interface StreamBlock {
  name: string;
  usedLength: number;
  /** Only when the destination block's page size differs from max(host page, TP) (hugetlbfs). */
  pageSize?: number;
}

/** The ram START section: total | MEM_SIZE, every block's name and length, EOS, footer. */
export function ramStart(b: Bytes, sid: number, blocks: readonly StreamBlock[]): Bytes {
  const total = blocks.reduce((n, x) => n + x.usedLength, 0);
  b.u8(SECTION_START).be32(sid).counted("ram").be32(0).be32(RAM_SECTION_VERSION);
  b.be64(total + RamFlag.MEM_SIZE);
  for (const x of blocks) {
    b.counted(x.name).be64(x.usedLength);
    if (x.pageSize !== undefined) b.be64(x.pageSize);
  }
  return b.be64(RamFlag.EOS).u8(FOOTER).be32(sid);
}

/** POSTCOPY_RAM_DISCARD of [start, start+length) bytes of one block. */
export function discard(b: Bytes, block: string, start: number, length: number): Bytes {
  const p = new Bytes(64).u8(0).counted(block).u8(0).be64(start).be64(length);
  return command(b, Cmd.POSTCOPY_RAM_DISCARD, p.take());
}

/** PACKAGED: LISTEN, the device state verbatim, RUN — read whole by the destination's main thread. */
export function packaged(b: Bytes, deviceState: Uint8Array): Bytes {
  const inner = new Bytes(deviceState.length + 16);
  command(inner, Cmd.POSTCOPY_LISTEN);
  inner.bytes(deviceState);
  command(inner, Cmd.POSTCOPY_RUN);
  const blob = inner.take();
  return command(b, Cmd.PACKAGED, new Bytes(4).be32(blob.length).take()).bytes(blob);
}

export function partHeader(b: Bytes, sid: number): Bytes {
  return b.u8(SECTION_PART).be32(sid);
}

export function endHeader(b: Bytes, sid: number): Bytes {
  return b.u8(SECTION_END).be32(sid);
}

export function sectionTail(b: Bytes, sid: number): Bytes {
  return b.be64(RamFlag.EOS).u8(FOOTER).be32(sid);
}

export function eof(b: Bytes): Bytes {
  return b.u8(QEMU_VM_EOF);
}

/**
 * One page record. `name` is written (and CONTINUE left clear) when given; `data` is the page's
 * bytes, or undefined for a ZERO record.
 */
export function pageRecord(b: Bytes, offset: number, name: string | undefined, data: Uint8Array | undefined): Bytes {
  const flags = (data ? RamFlag.PAGE : RamFlag.ZERO) | (name === undefined ? RamFlag.CONTINUE : 0);
  b.be64(offset + flags);
  if (name !== undefined) b.counted(name);
  return data ? b.bytes(data) : b.u8(0);
}

// ---- return path --------------------------------------------------------------------------

export type RpMessage =
  | { type: "shut"; value: number }
  | { type: "pong"; value: number }
  | { type: "req"; block: string | undefined; start: number; length: number }
  | { type: "other"; code: number };

export class RpError extends SnaploadError {
  constructor(message: string) {
    super("BAD_FRAME", message);
    this.name = "RpError";
  }
}

/** Splits the return-path byte stream into messages; keeps REQ_PAGES_ID's block for REQ_PAGES. */
export class ReturnPathDecoder {
  #pending: Buffer = Buffer.alloc(0);
  #block: string | undefined;

  push(chunk: Buffer): RpMessage[] {
    this.#pending = this.#pending.length === 0 ? chunk : Buffer.concat([this.#pending, chunk]);
    const out: RpMessage[] = [];
    let p = 0;
    const b = this.#pending;
    while (b.length - p >= 4) {
      const type = b.readUInt16BE(p);
      const len = b.readUInt16BE(p + 2);
      if (len > RP_MAX_LEN) throw new RpError(`return-path message ${type} of ${len} bytes (more than ${RP_MAX_LEN})`);
      if (b.length - p - 4 < len) break;
      const m = b.subarray(p + 4, p + 4 + len);
      p += 4 + len;
      switch (type) {
        case Rp.SHUT:
        case Rp.PONG:
          if (len !== 4) throw new RpError(`return-path message ${type} has length ${len}, expected 4`);
          out.push({ type: type === Rp.SHUT ? "shut" : "pong", value: m.readUInt32BE(0) });
          break;
        case Rp.REQ_PAGES_ID: {
          if (len < 13 || len !== 13 + m[12]!) throw new RpError(`REQ_PAGES_ID of length ${len} is malformed`);
          this.#block = m.subarray(13, 13 + m[12]!).toString("utf8");
          out.push({ type: "req", block: this.#block, start: Number(m.readBigUInt64BE(0)), length: m.readUInt32BE(8) });
          break;
        }
        case Rp.REQ_PAGES:
          if (len !== 12) throw new RpError(`REQ_PAGES has length ${len}, expected 12`);
          out.push({ type: "req", block: this.#block, start: Number(m.readBigUInt64BE(0)), length: m.readUInt32BE(8) });
          break;
        default:
          out.push({ type: "other", code: type });
      }
    }
    this.#pending = p === b.length ? Buffer.alloc(0) : b.subarray(p);
    return out;
  }
}
