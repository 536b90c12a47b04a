// AES-256-GCM from the system's OpenSSL (libcrypto.so.3) through bun:ffi. node:crypto has the
// same cipher, but its update() always returns a fresh buffer: page payloads would be decrypted
// into it and copied again into the slot UFFDIO_COPY installs from. EVP_CipherUpdate works in
// place, so a DATA payload is received into its slot and decrypted right there, and the server
// encrypts straight from its image mapping into one send buffer. The cipher and its tag check
// are OpenSSL's; this file only calls them (one context per key, the IV set per record).
import { dlopen, FFIType, type Pointer } from "bun:ffi";
import { SnaploadError } from "../core/errors.ts";

const { i32, ptr, void: none } = FFIType;

export const KEY_SIZE = 32;
export const TAG_SIZE = 16;
export const IV_SIZE = 12;

const EVP_CTRL_AEAD_GET_TAG = 0x10;
const EVP_CTRL_AEAD_SET_TAG = 0x11;
/** EVP_CipherInit_ex's `enc` argument: keep the direction chosen at the first init. */
const KEEP_DIRECTION = -1;

const symbols = {
  EVP_aes_256_gcm: { args: [], returns: ptr },
  EVP_chacha20_poly1305: { args: [], returns: ptr },
  EVP_CIPHER_CTX_new: { args: [], returns: ptr },
  EVP_CIPHER_CTX_free: { args: [ptr], returns: none },
  EVP_CipherInit_ex: { args: [ptr, ptr, ptr, ptr, ptr, i32], returns: i32 },
  EVP_CIPHER_CTX_ctrl: { args: [ptr, i32, i32, ptr], returns: i32 },
  EVP_CipherUpdate: { args: [ptr, ptr, ptr, ptr, i32], returns: i32 },
  EVP_CipherFinal_ex: { args: [ptr, ptr, ptr], returns: i32 },
} as const;

type Crypto = ReturnType<typeof dlopen<typeof symbols>>["symbols"];
let lib: Crypto | undefined;

function crypto(): Crypto {
  if (lib !== undefined) return lib;
  const name = process.env.SNAPLOAD_LIBCRYPTO ?? "libcrypto.so.3";
  try {
    lib = dlopen(name, symbols).symbols;
  } catch (e) {
    throw new SnaploadError("BAD_CONFIG", `postcopy encryption needs OpenSSL 3's ${name} (Debian: libssl3): ${(e as Error).message}`, { cause: e });
  }
  return lib;
}

/** Bytes the FFI takes as a pointer: a native address, or a typed array (pinned for the call). */
export type Bytes = number | Uint8Array;

const p = (b: Bytes): Pointer | Uint8Array => (typeof b === "number" ? (b as Pointer) : b);

/**
 * One direction's key. Each record gets its own 96-bit IV: a 32-bit record kind, then a 64-bit
 * sequence number the caller never reuses under this key.
 */
export class AeadKey {
  private ctx: Pointer | null;
  private readonly iv = new Uint8Array(IV_SIZE);
  private readonly ivView = new DataView(this.iv.buffer);
  private readonly outl = new Int32Array(1);

  private readonly scratch = new Uint8Array(16);

  /** ChaCha20-Poly1305 is here for the throughput comparison (bench/postcopy-crypto.ts) only. */
  constructor(key: Uint8Array, readonly encrypting: boolean, cipher: "aes-256-gcm" | "chacha20-poly1305" = "aes-256-gcm") {
    if (key.length !== KEY_SIZE) throw new SnaploadError("BAD_CONFIG", `AES-256-GCM key of ${key.length} bytes`);
    const c = crypto();
    const ctx = c.EVP_CIPHER_CTX_new() as Pointer | null;
    if (ctx === null) throw new SnaploadError("SYSCALL", "EVP_CIPHER_CTX_new failed");
    this.ctx = ctx;
    // The key schedule is computed once here; each record then only sets its IV.
    if (c.EVP_CipherInit_ex(ctx, cipher === "aes-256-gcm" ? c.EVP_aes_256_gcm() : c.EVP_chacha20_poly1305(), null, key, null, encrypting ? 1 : 0) !== 1) {
      this.free();
      throw new SnaploadError("SYSCALL", `EVP_CipherInit_ex(${cipher}) failed`);
    }
  }

  private begin(kind: number, seq: number): Pointer {
    const ctx = this.ctx;
    if (ctx === null) throw new SnaploadError("SYSCALL", "AEAD key used after it was freed");
    this.ivView.setUint32(0, kind, true);
    this.ivView.setUint32(4, seq % 0x1_0000_0000, true);
    this.ivView.setUint32(8, Math.floor(seq / 0x1_0000_0000), true);
    if (crypto().EVP_CipherInit_ex(ctx, null, null, null, this.iv, KEEP_DIRECTION) !== 1) throw new SnaploadError("SYSCALL", "EVP_CipherInit_ex(iv) failed");
    return ctx;
  }

  /** Encrypts `len` bytes from `src` to `dst` (they may be the same) and writes the tag to `tag`. */
  seal(kind: number, seq: number, src: Bytes, dst: Bytes, len: number, tag: Bytes): void {
    const c = crypto();
    const ctx = this.begin(kind, seq);
    if (len > 0 && c.EVP_CipherUpdate(ctx, p(dst), this.outl, p(src), len) !== 1) throw new SnaploadError("SYSCALL", "EVP_CipherUpdate(seal) failed");
    if (c.EVP_CipherFinal_ex(ctx, this.scratch, this.outl) !== 1) throw new SnaploadError("SYSCALL", "EVP_CipherFinal_ex(seal) failed");
    if (c.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, p(tag)) !== 1) throw new SnaploadError("SYSCALL", "reading the AEAD tag failed");
  }

  /**
   * Decrypts `len` bytes from `src` to `dst` (they may be the same) and checks the tag. False when
   * the record is not authentic: then `dst` holds garbage that must never be used.
   */
  open(kind: number, seq: number, src: Bytes, dst: Bytes, len: number, tag: Bytes): boolean {
    const c = crypto();
    const ctx = this.begin(kind, seq);
    if (c.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, p(tag)) !== 1) throw new SnaploadError("SYSCALL", "setting the AEAD tag failed");
    if (len > 0 && c.EVP_CipherUpdate(ctx, p(dst), this.outl, p(src), len) !== 1) return false;
    return c.EVP_CipherFinal_ex(ctx, this.scratch, this.outl) === 1;
  }

  /** Frees the context (OpenSSL wipes the key schedule). Idempotent. */
  free(): void {
    if (this.ctx === null) return;
    crypto().EVP_CIPHER_CTX_free(this.ctx);
    this.ctx = null;
  }
}

/** Throws a clear error now (at startup) rather than at the first connection. */
export function checkCrypto(): void {
  crypto();
}
