// The postcopy wire protocol (docs/postcopy-protocol.md): every frame is a fixed 32-byte
// little-endian header, then `length` payload bytes. Fixed headers let both sides read exactly
// a header, then exactly a payload straight into its final buffer (page bytes are never copied).
// After the handshake every frame travels sealed (src/postcopy/seal.ts).
import { ZeroMap } from "../sources/image/snapshot-image.ts";
import { SnaploadError } from "../core/errors.ts";

export const PROTOCOL_VERSION = 2;
export const HEADER_SIZE = 32;
export const CLIENT_MAGIC = 0x4350_4c53; // "SLPC" little-endian
export const SERVER_MAGIC = 0x5350_4c53; // "SLPS" little-endian
export const NONCE_SIZE = 32;
export const PROOF_SIZE = 32;

/** Bytes of one DATA payload at most: a fault never waits behind more than this on one connection. */
export const MAX_CHUNK = 128 * 1024;
/** Bytes one REQUEST may ask for (one 2 MiB huge page fits, with room). */
export const MAX_REQUEST = 4 * 1024 * 1024;
/** Zero-map bytes per ZERO_MAP frame (covers 2 GiB of image). */
export const MAX_ZERO_MAP_CHUNK = 64 * 1024;
export const MAX_ERROR_TEXT = 1024;
/** Requests a server keeps queued per connection before it calls the client abusive. */
export const MAX_OUTSTANDING = 65_536;
/** Largest image the protocol carries (the zero map alone is 512 MiB at this size). */
export const MAX_IMAGE_BYTES = 2 ** 44;
export const WIRE_PAGE = 4096;

export const FrameType = {
  HELLO: 1,
  CHALLENGE: 2,
  AUTH: 3,
  WELCOME: 4,
  ZERO_MAP: 5,
  REQUEST: 6,
  DATA: 7,
  ERROR: 8,
  PING: 9,
  PONG: 10,
  INFO: 11,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

export const FRAME_NAMES: Record<number, string> = {
  1: "HELLO", 2: "CHALLENGE", 3: "AUTH", 4: "WELCOME", 5: "ZERO_MAP", 6: "REQUEST", 7: "DATA", 8: "ERROR", 9: "PING", 10: "PONG", 11: "INFO",
};

export const HELLO_SIZE = 48;
export const CHALLENGE_SIZE = 48;
export const WELCOME_SIZE = PROOF_SIZE;
export const INFO_SIZE = 56;

/** Largest payload each frame type may carry; anything bigger is malformed. */
export const MAX_PAYLOAD: Record<number, number> = {
  [FrameType.HELLO]: HELLO_SIZE,
  [FrameType.CHALLENGE]: CHALLENGE_SIZE,
  [FrameType.AUTH]: PROOF_SIZE,
  [FrameType.WELCOME]: WELCOME_SIZE,
  [FrameType.ZERO_MAP]: MAX_ZERO_MAP_CHUNK,
  [FrameType.REQUEST]: 0,
  [FrameType.DATA]: MAX_CHUNK,
  [FrameType.ERROR]: MAX_ERROR_TEXT,
  [FrameType.PING]: 0,
  [FrameType.PONG]: 0,
  [FrameType.INFO]: INFO_SIZE,
};

/** Connection roles a client states in HELLO. */
export const Role = {
  /** Startup: fetch the image description and zero map, then close. */
  PROBE: 0,
  /** On-demand pages a vCPU waits for: answered first. */
  URGENT: 1,
  /** Background completion: sent in bounded chunks when nothing urgent is pending. */
  BACKGROUND: 2,
} as const;
export type Role = (typeof Role)[keyof typeof Role];
export const ROLE_NAMES = ["probe", "urgent", "background"] as const;

/** HELLO flag: send the zero map after WELCOME. */
export const WANT_ZERO_MAP = 1;

export const ErrorCode = {
  BAD_FRAME: 1,
  AUTH_FAILED: 2,
  VERSION: 3,
  OUT_OF_BOUNDS: 4,
  OVERLOADED: 5,
  TIMEOUT: 6,
  SHUTTING_DOWN: 7,
  UNAVAILABLE: 8,
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];
export const ERROR_NAMES: Record<number, string> = {
  1: "bad frame", 2: "authentication failed", 3: "unsupported version", 4: "out of bounds", 5: "overloaded", 6: "timeout", 7: "shutting down", 8: "unavailable",
};

/** A frame that breaks the protocol: the connection it came on is closed, nothing else is affected. */
export class ProtocolError extends SnaploadError {
  constructor(message: string, readonly wireCode: ErrorCode = ErrorCode.BAD_FRAME) {
    super(wireCode === ErrorCode.AUTH_FAILED ? "AUTH_FAILED" : "BAD_FRAME", message, { wireCode });
    this.name = "ProtocolError";
  }
}

/** A decoded header. Reused by readers (one object per connection), so copy what must outlive a frame. */
export class FrameHeader {
  type = 0;
  length = 0;
  id = 0;
  offset = 0;
  arg = 0;
}

const TWO32 = 0x1_0000_0000;

function getU64(v: DataView, at: number, what: string): number {
  const lo = v.getUint32(at, true);
  const hi = v.getUint32(at + 4, true);
  if (hi >= 0x20_0000) throw new ProtocolError(`${what} ${hi}*2^32+${lo} is beyond 2^53`);
  return hi * TWO32 + lo;
}

function setU64(v: DataView, at: number, n: number): void {
  v.setUint32(at, n % TWO32, true);
  v.setUint32(at + 4, Math.floor(n / TWO32), true);
}

/** Decodes and checks a header against the per-type limits. Throws ProtocolError. */
export function decodeHeader(v: DataView, at: number, h: FrameHeader): FrameHeader {
  const type = v.getUint8(at);
  const max = MAX_PAYLOAD[type];
  if (max === undefined) throw new ProtocolError(`unknown frame type ${type}`);
  if (v.getUint8(at + 1) !== 0 || v.getUint16(at + 2, true) !== 0) throw new ProtocolError(`${FRAME_NAMES[type]} frame with reserved header bits set`);
  const length = v.getUint32(at + 4, true);
  if (length > max) throw new ProtocolError(`${FRAME_NAMES[type]} frame of ${length} bytes (at most ${max})`);
  h.type = type;
  h.length = length;
  h.id = getU64(v, at + 8, "id");
  h.offset = getU64(v, at + 16, "offset");
  h.arg = v.getUint32(at + 24, true);
  if (v.getUint32(at + 28, true) !== 0) throw new ProtocolError(`${FRAME_NAMES[type]} frame with reserved header bits set`);
  return h;
}

export function encodeHeader(v: DataView, at: number, type: FrameType, length: number, id = 0, offset = 0, arg = 0): void {
  v.setUint8(at, type);
  v.setUint8(at + 1, 0);
  v.setUint16(at + 2, 0, true);
  v.setUint32(at + 4, length, true);
  setU64(v, at + 8, id);
  setU64(v, at + 16, offset);
  v.setUint32(at + 24, arg >>> 0, true);
  v.setUint32(at + 28, 0, true);
}

/** A whole control frame (header + payload) as fresh bytes. */
export function frame(type: FrameType, payload: Uint8Array | null, id = 0, offset = 0, arg = 0): Uint8Array {
  const len = payload?.length ?? 0;
  const out = new Uint8Array(HEADER_SIZE + len);
  encodeHeader(new DataView(out.buffer), 0, type, len, id, offset, arg);
  if (payload) out.set(payload, HEADER_SIZE);
  return out;
}

// ---- handshake payloads ------------------------------------------------------------------------

export interface Hello {
  versionMin: number;
  versionMax: number;
  role: Role;
  flags: number;
  nonce: Uint8Array;
}

export function encodeHello(h: Hello): Uint8Array {
  const p = new Uint8Array(HELLO_SIZE);
  const v = new DataView(p.buffer);
  v.setUint32(0, CLIENT_MAGIC, true);
  v.setUint16(4, h.versionMin, true);
  v.setUint16(6, h.versionMax, true);
  v.setUint8(8, h.role);
  v.setUint8(9, h.flags);
  p.set(h.nonce, 16);
  return p;
}

export function decodeHello(p: Uint8Array): Hello {
  if (p.length !== HELLO_SIZE) throw new ProtocolError(`HELLO of ${p.length} bytes (expected ${HELLO_SIZE})`);
  const v = new DataView(p.buffer, p.byteOffset, p.length);
  if (v.getUint32(0, true) !== CLIENT_MAGIC) throw new ProtocolError("HELLO without the SLPC magic: not a snapload postcopy client");
  const role = v.getUint8(8);
  if (role > Role.BACKGROUND) throw new ProtocolError(`HELLO with unknown role ${role}`);
  const flags = v.getUint8(9);
  if (flags & ~WANT_ZERO_MAP) throw new ProtocolError(`HELLO with unknown flags 0x${flags.toString(16)}`);
  return { versionMin: v.getUint16(4, true), versionMax: v.getUint16(6, true), role: role as Role, flags, nonce: p.slice(16, 48) };
}

export function encodeChallenge(version: number, nonce: Uint8Array): Uint8Array {
  const p = new Uint8Array(CHALLENGE_SIZE);
  const v = new DataView(p.buffer);
  v.setUint32(0, SERVER_MAGIC, true);
  v.setUint16(4, version, true);
  p.set(nonce, 16);
  return p;
}

export function decodeChallenge(p: Uint8Array): { version: number; nonce: Uint8Array } {
  if (p.length !== CHALLENGE_SIZE) throw new ProtocolError(`CHALLENGE of ${p.length} bytes (expected ${CHALLENGE_SIZE})`);
  const v = new DataView(p.buffer, p.byteOffset, p.length);
  if (v.getUint32(0, true) !== SERVER_MAGIC) throw new ProtocolError("CHALLENGE without the SLPS magic: not a snapload page server");
  return { version: v.getUint16(4, true), nonce: p.slice(16, 48) };
}

/** What the server says about its image once the client has proven the token. */
export interface ImageInfo {
  size: number;
  pages: number;
  dataPages: number;
  /** Changes when the served file changes: a reconnecting client refuses a different image. */
  id: Uint8Array;
  /**
   * The bytes are a snapshot FILE served whole (page-server --whole-file, for qemu-restore), not
   * guest memory: a daemon restoring a VM from them must refuse. INFO flags bit 0.
   */
  wholeFile?: boolean;
}

/** INFO flags (the u32 at offset 12, reserved before and sent as 0 by older servers). */
export const INFO_WHOLE_FILE = 1;

/** WELCOME: the server's proof, in clear (the last handshake frame; everything after it is sealed). */
export function encodeWelcome(proof: Uint8Array): Uint8Array {
  return proof.slice(0, PROOF_SIZE);
}

export function decodeWelcome(p: Uint8Array): Uint8Array {
  if (p.length !== WELCOME_SIZE) throw new ProtocolError(`WELCOME of ${p.length} bytes (expected ${WELCOME_SIZE})`);
  return p.slice();
}

/** INFO, the first sealed frame from the server: what it serves. */
export function encodeInfo(info: ImageInfo): Uint8Array {
  const p = new Uint8Array(INFO_SIZE);
  const v = new DataView(p.buffer);
  setU64(v, 0, info.size);
  v.setUint32(8, WIRE_PAGE, true);
  v.setUint32(12, info.wholeFile ? INFO_WHOLE_FILE : 0, true);
  setU64(v, 16, info.pages);
  setU64(v, 24, info.dataPages);
  p.set(info.id.subarray(0, 16), 32);
  v.setUint32(48, MAX_CHUNK, true);
  v.setUint32(52, MAX_REQUEST, true);
  return p;
}

export function decodeInfo(p: Uint8Array): { info: ImageInfo; maxRequest: number } {
  if (p.length !== INFO_SIZE) throw new ProtocolError(`INFO of ${p.length} bytes (expected ${INFO_SIZE})`);
  const v = new DataView(p.buffer, p.byteOffset, p.length);
  const size = getU64(v, 0, "image size");
  const pageSize = v.getUint32(8, true);
  const pages = getU64(v, 16, "page count");
  const dataPages = getU64(v, 24, "data page count");
  if (pageSize !== WIRE_PAGE) throw new ProtocolError(`INFO with page size ${pageSize} (this client speaks ${WIRE_PAGE})`);
  if (size === 0 || size > MAX_IMAGE_BYTES) throw new ProtocolError(`INFO with image size ${size}`);
  if (pages !== Math.ceil(size / WIRE_PAGE) || dataPages > pages) throw new ProtocolError(`INFO with ${pages} pages (${dataPages} data) for ${size} bytes`);
  const maxRequest = v.getUint32(52, true);
  if (maxRequest < 2 * 1024 * 1024) throw new ProtocolError(`INFO allowing requests of only ${maxRequest} bytes (a 2 MiB page must fit)`);
  const wholeFile = (v.getUint32(12, true) & INFO_WHOLE_FILE) !== 0;
  return { info: { size, pages, dataPages, id: p.slice(32, 48), ...(wholeFile ? { wholeFile } : {}) }, maxRequest };
}

// ---- requests and replies -------------------------------------------------------------------

/**
 * A REQUEST for `size` bytes at image `offset`: throws ProtocolError unless it is whole 4 KiB
 * pages, 4 KiB to MAX_REQUEST; false when it reaches outside an image of `imageSize` bytes.
 */
export function requestInBounds(id: number, offset: number, size: number, imageSize: number): boolean {
  if (size === 0 || size > MAX_REQUEST || size % WIRE_PAGE !== 0 || offset % WIRE_PAGE !== 0) {
    throw new ProtocolError(`REQUEST ${id} for ${size} bytes at ${offset}: requests are whole 4 KiB pages, 4 KiB to ${MAX_REQUEST / (1024 * 1024)} MiB`);
  }
  return offset + size <= imageSize;
}

/**
 * A DATA chunk [off, off+len) of request `id` (image bytes [start, start+bytes), received up to
 * `cursor`): whole pages, in order, inside the request; the pages it skipped are zero pages and
 * those it carries are data pages. Throws ProtocolError.
 */
export function checkDataChunk(id: number, off: number, len: number, cursor: number, start: number, bytes: number, zero: ZeroMap): void {
  if (len === 0 || off % WIRE_PAGE !== 0 || len % WIRE_PAGE !== 0 || off < cursor || off + len > bytes) {
    throw new ProtocolError(`DATA for request ${id} at [${off}, +${len}) does not fit [${cursor}, ${bytes}) in whole pages`);
  }
  const skipFrom = (start + cursor) / WIRE_PAGE;
  const chunkFirst = (start + off) / WIRE_PAGE;
  if (!zero.isRangeZero(skipFrom, chunkFirst - skipFrom) || !zero.isRangeData(chunkFirst, len / WIRE_PAGE)) {
    throw new ProtocolError(`DATA for request ${id} at [${off}, +${len}) disagrees with the zero map`);
  }
}

// ---- zero map ------------------------------------------------------------------------------------

/** One bit per 4 KiB page, least significant bit first, 1 = zero (never sent). */
export function zeroMapBytes(zero: ZeroMap): Uint8Array {
  const out = new Uint8Array(Math.ceil(zero.pages / 8));
  for (const run of zero.runs(0, zero.pages)) {
    if (!run.zero) continue;
    let p = run.first;
    const end = run.first + run.count;
    while (p < end && (p & 7) !== 0) out[p >>> 3]! |= 1 << (p++ & 7);
    if (end - p >= 8) {
      out.fill(0xff, p >>> 3, end >>> 3);
      p = end - (end % 8);
    }
    while (p < end) out[p >>> 3]! |= 1 << (p++ & 7);
  }
  return out;
}

export function zeroMapFromBytes(bits: Uint8Array, pages: number): ZeroMap {
  if (bits.length !== Math.ceil(pages / 8)) throw new ProtocolError(`zero map of ${bits.length} bytes for ${pages} pages`);
  const zero = new ZeroMap(pages);
  let p = 0;
  while (p < pages) {
    const byte = bits[p >>> 3]!;
    if (byte === 0 && (p & 7) === 0) {
      p += 8;
      continue;
    }
    if (!((byte >>> (p & 7)) & 1)) {
      p++;
      continue;
    }
    let e = p + 1;
    while (e < pages && (bits[e >>> 3]! >>> (e & 7)) & 1) e++;
    zero.setZeroRange(p, e - p);
    p = e;
  }
  // Bits past the last page must be clear: anything else is a corrupt map.
  for (let q = pages; q < bits.length * 8; q++) if ((bits[q >>> 3]! >>> (q & 7)) & 1) throw new ProtocolError("zero map has bits set past the last page");
  return zero;
}

export function errorText(code: number, message: string): string {
  return `${ERROR_NAMES[code] ?? `error ${code}`}: ${message}`;
}

/** An ERROR frame; the text is cut to the protocol's limit. */
export function errorFrame(code: ErrorCode, message: string, id = 0): Uint8Array {
  let text = new TextEncoder().encode(message);
  if (text.length > MAX_ERROR_TEXT) text = text.subarray(0, MAX_ERROR_TEXT);
  return frame(FrameType.ERROR, text, id, 0, code);
}

export function decodeErrorText(p: Uint8Array): string {
  return new TextDecoder("utf-8", { fatal: false }).decode(p).replace(/[\x00-\x1f\x7f]/g, "?");
}
