// Sealed frames: how every frame after the handshake travels (docs/postcopy-protocol.md).
//
//   [ AES-256-GCM(header ‖ payload tag) ‖ its tag ]  64 bytes, IV = (0, seq)
//   [ AES-256-GCM(payload) ]                          `length` bytes, IV = (1, seq), tag in the header
//
// One key per direction and per connection (auth.ts sessionKeys); `seq` counts frames from 0 in
// each direction and is never sent: a frame replayed, reordered, dropped or moved to another
// connection is opened with the wrong IV or key and fails. Both the header (ids, offsets,
// lengths) and the payload are secret. The header is opened first (fixed size), so the reader
// knows where the payload goes and receives it straight into its final buffer, where it is
// decrypted in place; until its tag checked out, those bytes are never used.
import { AeadKey, type Bytes, TAG_SIZE } from "./aead.ts";
import { ErrorCode, HEADER_SIZE, ProtocolError } from "./protocol.ts";

export const SEALED_HEADER_SIZE = HEADER_SIZE + 2 * TAG_SIZE;
const PLAIN_HEADER_SIZE = HEADER_SIZE + TAG_SIZE;
const KIND_HEADER = 0;
const KIND_PAYLOAD = 1;

/** A sealed frame that does not open: changed, replayed, reordered or cut in transit, or a wrong key. */
export class SealError extends ProtocolError {
  constructor(message: string) {
    super(message, ErrorCode.BAD_FRAME);
    this.name = "SealError";
  }
}

export class SendSeal {
  private seq = 0;
  private readonly key: AeadKey;
  private readonly plain = new Uint8Array(PLAIN_HEADER_SIZE);

  constructor(key: Uint8Array) {
    this.key = new AeadKey(key, true);
  }

  /** Seals a whole clear frame (header and payload, as protocol.ts `frame()` builds it) into fresh bytes. */
  frame(clear: Uint8Array): Uint8Array {
    const len = clear.length - HEADER_SIZE;
    const out = new Uint8Array(SEALED_HEADER_SIZE + len);
    if (len > 0) this.seal(clear.subarray(0, HEADER_SIZE), clear.subarray(HEADER_SIZE), out.subarray(SEALED_HEADER_SIZE), len, out);
    else this.seal(clear, 0, 0, 0, out);
    return out;
  }

  /**
   * Seals a header and its payload: `len` bytes at `src` are encrypted to `dst` (the bytes that
   * go on the wire after the returned 64-byte sealed header).
   */
  data(header: Uint8Array, src: Bytes, dst: Bytes, len: number): Uint8Array {
    const out = new Uint8Array(SEALED_HEADER_SIZE);
    this.seal(header, src, dst, len, out);
    return out;
  }

  private seal(header: Uint8Array, src: Bytes, dst: Bytes, len: number, out: Uint8Array): void {
    const seq = this.seq++;
    this.plain.set(header.subarray(0, HEADER_SIZE), 0);
    const payloadTag = this.plain.subarray(HEADER_SIZE);
    if (len > 0) this.key.seal(KIND_PAYLOAD, seq, src, dst, len, payloadTag);
    else payloadTag.fill(0);
    this.key.seal(KIND_HEADER, seq, this.plain, out, PLAIN_HEADER_SIZE, out.subarray(PLAIN_HEADER_SIZE, SEALED_HEADER_SIZE));
  }

  free(): void {
    this.key.free();
  }
}

export class ReceiveSeal {
  private seq = 0;
  private readonly key: AeadKey;
  private readonly payloadTag = new Uint8Array(TAG_SIZE);

  constructor(key: Uint8Array) {
    this.key = new AeadKey(key, false);
  }

  /** Opens a 64-byte sealed header in place: its first HEADER_SIZE bytes are then the clear header. Throws SealError. */
  openHeader(rec: Uint8Array): void {
    if (!this.key.open(KIND_HEADER, this.seq, rec, rec, PLAIN_HEADER_SIZE, rec.subarray(PLAIN_HEADER_SIZE, SEALED_HEADER_SIZE))) {
      throw new SealError(`frame ${this.seq} failed authentication (changed, replayed, reordered or cut in transit)`);
    }
    this.payloadTag.set(rec.subarray(HEADER_SIZE, PLAIN_HEADER_SIZE));
  }

  /** Decrypts the payload of the frame whose header was opened last, in place, and checks it. Throws SealError. */
  openPayload(at: Bytes, len: number): void {
    if (!this.key.open(KIND_PAYLOAD, this.seq, at, at, len, this.payloadTag)) {
      throw new SealError(`the payload of frame ${this.seq} (${len} bytes) failed authentication (changed in transit)`);
    }
  }

  /** The frame whose header was opened last is complete. */
  next(): void {
    this.seq++;
  }

  free(): void {
    this.key.free();
  }
}
