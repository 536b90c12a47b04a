// The common shape of a memory image (raw file or one QEMU mapped-ram RAMBlock), plus the
// small file helpers both formats share. Page data is only ever reached through `base`
// (a read-only mapping), never copied through JS.
import type { Pointer } from "bun:ffi";
import { check } from "../../core/check.ts";
import { ImageError } from "../../core/errors.ts";
import { cstr, sl } from "../../core/ffi.ts";

export const IMAGE_PAGE = 4096;
/**
 * Largest image (raw file, or one mapped-ram block / total RAM) served: 4 TiB. Per-page maps are
 * sized by it (zero map: 128 MiB, a region's page states: up to 1 GiB), so a header claiming
 * more is refused with a clear error instead of failing an allocation.
 */
export const MAX_IMAGE_BYTES = 2 ** 42;

/** Refuses sizes beyond MAX_IMAGE_BYTES with an ImageError naming what claimed them. */
export function checkImageSize(size: number, path: string, what: string, ctx: Record<string, unknown> = {}): void {
  if (size > MAX_IMAGE_BYTES) {
    throw new ImageError(`${path}: ${what} ${size} bytes is larger than the ${MAX_IMAGE_BYTES / 2 ** 40} TiB snapload serves`, {
      path,
      ...ctx,
      size,
      max: MAX_IMAGE_BYTES,
    });
  }
}

export type ImageFormat = "raw" | "mapped-ram";

/** One RAMBlock of a mapped-ram file. Page counts here are in the block's own page size. */
export interface MappedRamBlockInfo {
  readonly name: string;
  readonly usedLength: number;
  readonly pageSize: number;
  readonly recordOffset: number; // where the block's record (name length byte) starts
  readonly headerOffset: number; // where its MappedRamHeader starts
  readonly bitmapOffset: number;
  readonly pagesOffset: number;
  readonly pages: number;
  readonly dataPages: number;
  readonly zeroPages: number;
}

export interface SnapshotImage {
  readonly format: ImageFormat;
  readonly path: string;
  /** Bytes addressable by a region's `offset` (raw: file size; mapped-ram: the block's used_length). */
  readonly size: number;
  /** Address of a PROT_READ mapping where image byte 0 lives. Only data pages are guaranteed
   *  to be backed by the file: never read a page that `zero` says is zero. */
  readonly base: number;
  readonly zero: ZeroMap;
  readonly dataPages: number; // 4 KiB pages
  readonly zeroPages: number; // 4 KiB pages
  readonly blockName?: string;
  readonly blocks?: MappedRamBlockInfo[];
  close(): void;
}

/**
 * One bit per 4 KiB page, 1 = the page is known to be all zero. Bits past `pages` stay 0.
 * Scans go a 32-bit word at a time so splitting a large range into runs stays cheap.
 */
export class ZeroMap {
  readonly pages: number;
  readonly #bits: Uint32Array;

  constructor(pages: number) {
    if (!Number.isSafeInteger(pages) || pages < 0) throw new ImageError(`a zero map of ${pages} pages: not a page count`, { pages });
    this.pages = pages;
    this.#bits = new Uint32Array(Math.ceil(pages / 32));
  }

  /** A map covering ceil(size / 4096) pages. */
  static forSize(size: number): ZeroMap {
    return new ZeroMap(Math.ceil(size / IMAGE_PAGE));
  }

  isZero(page: number): boolean {
    this.#checkRange(page, 1);
    return ((this.#bits[page >>> 5]! >>> (page & 31)) & 1) === 1;
  }

  setZero(page: number): void {
    this.#checkRange(page, 1);
    this.#bits[page >>> 5]! |= 1 << (page & 31);
  }

  setZeroRange(first: number, count: number): void {
    this.#checkRange(first, count);
    let p = first;
    const end = first + count;
    while (p < end && (p & 31) !== 0) this.#bits[p >>> 5]! |= 1 << (p++ & 31);
    while (p + 32 <= end) {
      this.#bits[p >>> 5] = 0xffff_ffff;
      p += 32;
    }
    while (p < end) this.#bits[p >>> 5]! |= 1 << (p++ & 31);
  }

  countZero(): number {
    let n = 0;
    for (const w of this.#bits) n += popcount(w);
    return n;
  }

  /** True when every page of [first, first+count) is zero (true for count 0). */
  isRangeZero(first: number, count: number): boolean {
    return this.nextData(first, first + count) === first + count;
  }

  /** True when no page of [first, first+count) is zero. */
  isRangeData(first: number, count: number): boolean {
    return this.nextZero(first, first + count) === first + count;
  }

  /** First data (non-zero) page in [from, limit), or limit if there is none. */
  nextData(from: number, limit: number = this.pages): number {
    return this.#scan(from, limit, 0xffff_ffff);
  }

  /** First zero page in [from, limit), or limit if there is none. */
  nextZero(from: number, limit: number = this.pages): number {
    return this.#scan(from, limit, 0);
  }

  /** Splits [first, first+count) into maximal runs of zero or data pages. */
  *runs(first: number, count: number): Generator<{ first: number; count: number; zero: boolean }> {
    this.#checkRange(first, count);
    const end = first + count;
    let p = first;
    while (p < end) {
      const zero = this.isZero(p);
      const next = zero ? this.nextData(p, end) : this.nextZero(p, end);
      yield { first: p, count: next - p, zero };
      p = next;
    }
  }

  // Finds the first page whose bit differs from the pattern in `flip` (0xffffffff: look for 0 bits).
  #scan(from: number, limit: number, flip: number): number {
    this.#checkRange(from, limit - from);
    if (from >= limit) return limit;
    let w = from >>> 5;
    let word = ((this.#bits[w]! ^ flip) & (0xffff_ffff << (from & 31))) >>> 0;
    for (;;) {
      if (word !== 0) {
        const p = w * 32 + ctz(word);
        return p < limit ? p : limit;
      }
      w++;
      if (w * 32 >= limit) return limit;
      word = (this.#bits[w]! ^ flip) >>> 0;
    }
  }

  #checkRange(first: number, count: number): void {
    if (!(first >= 0 && count >= 0 && first + count <= this.pages && Number.isInteger(first) && Number.isInteger(count))) {
      throw new ImageError(`pages [${first}, +${count}) outside the zero map of ${this.pages} pages`, { first, count, pages: this.pages });
    }
  }
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x5555_5555;
  x = (x & 0x3333_3333) + ((x >>> 2) & 0x3333_3333);
  x = (x + (x >>> 4)) & 0x0f0f_0f0f;
  return Math.imul(x, 0x0101_0101) >>> 24;
}

function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}

// ---- file helpers shared by the image formats ------------------------------------------------

/** Opens a file read-only and returns its fd and size; refuses anything but a regular file. */
export function openRegularFile(path: string): { fd: number; size: number } {
  const fd = check("open", sl.sl_file_open_ro(cstr(path)), { path });
  try {
    const size = new BigUint64Array(1);
    const regular = new Int32Array(1);
    check("fstat", sl.sl_file_stat(fd, size, regular), { path });
    if (regular[0] !== 1) throw new ImageError(`${path}: not a regular file`, { path });
    if (size[0]! > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageError(`${path}: file too large`, { path });
    return { fd, size: Number(size[0]) };
  } catch (e) {
    sl.sl_close(fd);
    throw e;
  }
}

/** Reads exactly `len` bytes at `off` (len small: headers and bitmaps); fewer only past EOF. */
export function preadAt(fd: number, into: Uint8Array, len: number, off: number, path: string): number {
  return check("pread", sl.sl_file_pread(fd, into, len, off), { path, offset: off, length: len });
}

/**
 * Maps [off, off+len) of fd PROT_READ, MAP_PRIVATE, not populated. `prefault` fills the page
 * tables for what is already cached (uffd copies then never fault on our side); a reader that
 * copies each page once anyway (the QEMU sink) skips it and starts sooner.
 */
export function mapReadOnly(fd: number, len: number, off: number, path: string, prefault = true): number {
  const out = new BigUint64Array(1);
  check("mmap", sl.sl_file_map(fd, len, off, 0, out), { path, offset: off, length: len });
  const addr = Number(out[0]);
  if (prefault) prefaultResident(addr, len);
  return addr;
}

const MADV_POPULATE_READ = 22;
const MINCORE_CHUNK = 1 << 30;

/**
 * Fills our page tables for the parts of the image already in the page cache, so UFFDIO_COPY
 * never takes a fault on the source side (Firecracker's example maps with MAP_POPULATE; that
 * would also read a cold image from disk up front — this reads nothing). Best effort: on a
 * kernel without MADV_POPULATE_READ the copies just fault as before.
 */
function prefaultResident(addr: number, len: number): void {
  for (let start = 0; start < len; start += MINCORE_CHUNK) {
    const chunk = Math.min(MINCORE_CHUNK, len - start);
    const pages = Math.ceil(chunk / IMAGE_PAGE);
    const vec = new Uint8Array(pages);
    if (sl.sl_mincore((addr + start) as Pointer, chunk, vec) < 0) return;
    let p = 0;
    while (p < pages) {
      if (!(vec[p]! & 1)) {
        p++;
        continue;
      }
      let e = p + 1;
      while (e < pages && vec[e]! & 1) e++;
      const end = Math.min(e * IMAGE_PAGE, chunk);
      if (sl.sl_madvise((addr + start + p * IMAGE_PAGE) as Pointer, end - p * IMAGE_PAGE, MADV_POPULATE_READ) < 0) return;
      p = e;
    }
  }
}

/** The SnapshotImage both formats return: owns one mapping (or none when nothing is backed). */
export class MappedImage implements SnapshotImage {
  readonly format: ImageFormat;
  readonly path: string;
  readonly size: number;
  readonly zero: ZeroMap;
  readonly dataPages: number;
  readonly zeroPages: number;
  readonly blockName?: string;
  readonly blocks?: MappedRamBlockInfo[];
  readonly #mapAddr: number;
  readonly #mapLen: number;
  #closed = false;

  constructor(init: {
    format: ImageFormat;
    path: string;
    size: number;
    zero: ZeroMap;
    mapAddr: number;
    mapLen: number;
    blockName?: string;
    blocks?: MappedRamBlockInfo[];
  }) {
    this.format = init.format;
    this.path = init.path;
    this.size = init.size;
    this.zero = init.zero;
    this.zeroPages = init.zero.countZero();
    this.dataPages = init.zero.pages - this.zeroPages;
    this.#mapAddr = init.mapAddr;
    this.#mapLen = init.mapLen;
    if (init.blockName !== undefined) this.blockName = init.blockName;
    if (init.blocks !== undefined) this.blocks = init.blocks;
  }

  // A getter so that a use after close fails loudly instead of faulting on an unmapped address.
  get base(): number {
    if (this.#closed) throw new ImageError(`${this.path}: image is closed`, { path: this.path });
    return this.#mapAddr;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#mapLen > 0) sl.sl_unmap(this.#mapAddr as Pointer, this.#mapLen);
  }
}
