// zstd decompression into memory we reuse. Bun.zstdDecompressSync allocates its output, and on a
// VM whose first touch of fresh memory is slow (shared/docs/facts.md) that costs more than the
// decompression itself (~100 ms vs ~11 ms for 24 MiB here). libzstd (Debian's libzstd1, which
// dpkg itself depends on) decompresses into a buffer of ours; without it we fall back to Bun's.
import { dlopen, FFIType, type Pointer, ptr } from "bun:ffi";

const { ptr: P, u64 } = FFIType;

function load() {
  for (const name of ["libzstd.so.1", "libzstd.so"]) {
    try {
      return dlopen(name, {
        ZSTD_decompress: { args: [P, u64, P, u64], returns: u64 },
        ZSTD_isError: { args: [u64], returns: FFIType.u32 },
      }).symbols;
    } catch {
      // Try the next name; none: Bun's decompressor.
    }
  }
  return undefined;
}

const lib = load();

export const nativeZstd = lib !== undefined;

/**
 * Decompresses one zstd frame into `into` (at most into.length bytes). Returns the bytes written,
 * or -1 when the frame is corrupt or does not fit. Without libzstd, returns undefined: use Bun's.
 */
export function zstdDecompressInto(src: Uint8Array, into: Uint8Array): number | undefined {
  if (lib === undefined) return undefined;
  if (src.length === 0) return -1;
  const r = lib.ZSTD_decompress(ptr(into) as Pointer, into.length, ptr(src) as Pointer, src.length);
  const n = typeof r === "bigint" ? r : BigInt(r);
  if (lib.ZSTD_isError(n) !== 0) return -1;
  return Number(n);
}
