// QEMU mapped-ram migration files (docs/mapped-ram-format.md has the byte layout).
// Only the stream header, the RAM block records and their bitmaps are read; page data is mapped.
import { sl, NativeBuffer } from "../../core/ffi.ts";
import { ImageError } from "../../core/errors.ts";
import {
  IMAGE_PAGE,
  MappedImage,
  checkImageSize,
  ZeroMap,
  mapReadOnly,
  openRegularFile,
  preadAt,
  type MappedRamBlockInfo,
  type SnapshotImage,
} from "./snapshot-image.ts";

export const QEVM_MAGIC = "QEVM";
const STREAM_VERSION = 3;
const SECTION_START = 0x01;
const RAM_SECTION_VERSION = 4;
const RAM_SAVE_FLAG_MEM_SIZE = 0x04;
const HEADER_VERSION = 1;
const HEADER_SIZE = 28; // packed: be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset
const PAGES_ALIGN = 1 << 20; // MAPPED_RAM_FILE_OFFSET_ALIGNMENT
const SCAN_LIMIT = 64 * 1024; // the configuration section is a few hundred bytes in practice
const WINDOW = 64 * 1024;
const MAX_BLOCKS = 4096;

export interface MappedRamFile {
  readonly path: string;
  readonly fileSize: number;
  readonly totalRam: number;
  readonly ramSectionOffset: number;
  readonly ignoreShared: boolean;
  readonly blocks: MappedRamBlockInfo[];
}

const hex = (n: number) => `0x${n.toString(16)}`;

/** Reads headers and bitmaps only, validates everything and describes every RAMBlock. */
export function parseMappedRam(path: string): MappedRamFile {
  const { fd, size } = openRegularFile(path);
  try {
    return parseOpen(fd, size, path);
  } finally {
    sl.sl_close(fd);
  }
}

/** Opens one RAMBlock (by name, or the largest) as a SnapshotImage. */
export function openMappedRamImage(path: string, ramblock?: string, prefault = true): SnapshotImage {
  const { fd, size } = openRegularFile(path);
  try {
    const file = parseOpen(fd, size, path);
    return openBlock(fd, size, file, selectBlock(file, ramblock), prefault);
  } finally {
    sl.sl_close(fd);
  }
}

/** Every RAMBlock of the file as a SnapshotImage, in file order, from one parse (the QEMU sink). */
export function openMappedRamBlocks(path: string, prefault = true): SnapshotImage[] {
  const { fd, size } = openRegularFile(path);
  const opened: SnapshotImage[] = [];
  try {
    const file = parseOpen(fd, size, path);
    for (const block of file.blocks) opened.push(openBlock(fd, size, file, block, prefault));
    return opened;
  } catch (e) {
    for (const i of opened) i.close();
    throw e;
  } finally {
    sl.sl_close(fd);
  }
}

function openBlock(fd: number, size: number, file: MappedRamFile, block: MappedRamBlockInfo, prefault: boolean): SnapshotImage {
  const { path } = file;
  const zero = readZeroMap(fd, size, path, block);
  // Every set page lies inside the file (checked); a zero tail past EOF is left unmapped.
  const mapLen = Math.max(0, Math.min(block.usedLength, size - block.pagesOffset));
  const mapAddr = mapLen > 0 ? mapReadOnly(fd, mapLen, block.pagesOffset, path, prefault) : 0;
  return new MappedImage({
    format: "mapped-ram",
    path,
    size: block.usedLength,
    zero,
    mapAddr,
    mapLen,
    blockName: block.name,
    blocks: file.blocks,
  });
}

/** The block `serve` uses by default: the largest (the first of equals), i.e. the guest's main RAM. */
export function defaultBlock(blocks: readonly MappedRamBlockInfo[]): MappedRamBlockInfo {
  let best = blocks[0]!;
  for (const b of blocks) if (b.usedLength > best.usedLength) best = b;
  return best;
}

export function selectBlock(file: MappedRamFile, name?: string): MappedRamBlockInfo {
  if (name === undefined) return defaultBlock(file.blocks);
  const found = file.blocks.find((b) => b.name === name);
  if (found) return found;
  const names = file.blocks.map((b) => b.name);
  throw new ImageError(
    `${file.path}: no RAM block named "${name}"; blocks in this file: ${names.map((n) => `"${n}"`).join(", ")}`,
    { path: file.path, ramblock: name, blocks: names },
  );
}

// ---- parsing ----------------------------------------------------------------------------------

/** Bounded reads of small header fields through one native window; never past EOF. */
class HeaderReader {
  readonly #buf = new NativeBuffer(WINDOW);
  #start = 0;
  #len = 0;

  constructor(
    readonly fd: number | Pread,
    readonly path: string,
    readonly fileSize: number,
  ) {}

  /** A view of [off, off+len), valid until the next read. */
  view(off: number, len: number, what: string, ctx: Record<string, unknown> = {}): Uint8Array {
    if (len > WINDOW) throw new ImageError(`${this.path}: the ${what} (${len} bytes) is larger than the ${WINDOW}-byte read window`, { path: this.path, ...ctx, length: len });
    if (off + len > this.fileSize) {
      throw new ImageError(
        `${this.path}: file ends at ${hex(this.fileSize)}, before the ${what} at ${hex(off)}..${hex(off + len)} (truncated file?)`,
        { path: this.path, ...ctx, offset: off, length: len, fileSize: this.fileSize },
      );
    }
    if (off < this.#start || off + len > this.#start + this.#len) {
      const want = Math.min(WINDOW, this.fileSize - off);
      const got = typeof this.fd === "number" ? preadAt(this.fd, this.#buf.bytes, want, off, this.path) : this.fd(this.#buf.bytes, want, off);
      if (got < len) {
        throw new ImageError(`${this.path}: short read at ${hex(off)} (file changed while reading?)`, {
          path: this.path,
          ...ctx,
          offset: off,
        });
      }
      this.#start = off;
      this.#len = got;
    }
    return this.#buf.bytes.subarray(off - this.#start, off - this.#start + len);
  }

  u8(off: number, what: string, ctx?: Record<string, unknown>): number {
    return this.view(off, 1, what, ctx)[0]!;
  }

  be32(off: number, what: string, ctx?: Record<string, unknown>): number {
    const v = this.view(off, 4, what, ctx);
    return ((v[0]! << 24) | (v[1]! << 16) | (v[2]! << 8) | v[3]!) >>> 0;
  }

  be64(off: number, what: string, ctx: Record<string, unknown> = {}): number {
    const v = this.view(off, 8, what, ctx);
    const big = new DataView(v.buffer, v.byteOffset, 8).getBigUint64(0, false);
    if (big > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ImageError(`${this.path}: ${what} 0x${big.toString(16)} at ${hex(off)} is out of range`, {
        path: this.path,
        ...ctx,
        offset: off,
      });
    }
    return Number(big);
  }

  free(): void {
    this.#buf.free();
  }
}

/**
 * Reads `len` bytes at `off` into `into`; returns how many (fewer only past the end). Lets the
 * parsers read a snapshot that is not a local file (qemu-restore from a page server or a store).
 */
export type Pread = (into: Uint8Array, len: number, off: number) => number;

/** parseMappedRam over any reader: `path` names the snapshot in messages. */
export function parseMappedRamFrom(read: Pread, fileSize: number, path: string): MappedRamFile {
  return parseOpen(read, fileSize, path);
}

/** One block's zero map (from its bitmap) over any reader. */
export function blockZeroMapFrom(read: Pread, fileSize: number, path: string, block: MappedRamBlockInfo): ZeroMap {
  return readZeroMap(read, fileSize, path, block);
}

function parseOpen(fd: number | Pread, fileSize: number, path: string): MappedRamFile {
  const r = new HeaderReader(fd, path, fileSize);
  try {
    return parseWith(r);
  } finally {
    r.free();
  }
}

function parseWith(r: HeaderReader): MappedRamFile {
  const { path, fileSize } = r;
  const fail = (msg: string, ctx: Record<string, unknown> = {}) => new ImageError(`${path}: ${msg}`, { path, ...ctx });

  const magic = String.fromCharCode(...r.view(0, 4, "stream magic"));
  if (magic !== QEVM_MAGIC) throw fail(`not a QEMU migration stream (magic "${magic}")`);
  const version = r.be32(4, "stream version");
  if (version !== STREAM_VERSION) {
    throw fail(`unsupported QEMU migration stream version ${version} (expected ${STREAM_VERSION})`, { version });
  }

  // Find the RAM section start after the configuration section; searching is simpler and more
  // tolerant of QEMU's optional configuration subsections than decoding them.
  const scanLen = Math.min(fileSize, SCAN_LIMIT) - 8;
  const head = scanLen > 0 ? r.view(8, scanLen, "stream header").slice() : new Uint8Array(0);
  const ramAt = findRamSection(head);
  if (ramAt < 0) throw fail(`no RAM section found in the first ${SCAN_LIMIT / 1024} KiB of the stream`);
  const ramSectionOffset = 8 + ramAt;
  const config = head.subarray(0, ramAt);
  if (!hasCapability(config, "mapped-ram")) {
    throw fail(
      "not a mapped-ram stream: the configuration does not list the mapped-ram capability " +
        "(save with `migrate_set_capability mapped-ram on`)",
      { ramSectionOffset },
    );
  }
  const ignoreShared = hasCapability(config, "x-ignore-shared");

  const ramVersion = r.be32(ramSectionOffset + 13, "RAM section version");
  if (ramVersion !== RAM_SECTION_VERSION) {
    throw fail(`unsupported RAM section version ${ramVersion} (expected ${RAM_SECTION_VERSION})`, { ramSectionOffset });
  }
  const totalAt = ramSectionOffset + 17;
  const totalWord = r.be64(totalAt, "total RAM size");
  const flags = totalWord % 0x1000;
  const totalRam = totalWord - flags;
  if (flags !== RAM_SAVE_FLAG_MEM_SIZE) {
    throw fail(`RAM section does not start with the total RAM size (flags ${hex(flags)}, expected 0x4)`, {
      offset: totalAt,
    });
  }
  if (totalRam === 0) throw fail("total RAM size is 0", { offset: totalAt });
  checkImageSize(totalRam, path, "total RAM size", { offset: totalAt });

  const blocks: MappedRamBlockInfo[] = [];
  let pos = totalAt + 8;
  let sum = 0;
  while (sum < totalRam) {
    if (blocks.length >= MAX_BLOCKS) throw fail(`more than ${MAX_BLOCKS} RAM blocks`, { offset: pos });
    const block = parseBlock(r, pos, { sum, totalRam, ignoreShared });
    if (blocks.some((b) => b.name === block.name)) {
      throw fail(`duplicate RAM block "${block.name}"`, { block: block.name, recordOffset: pos });
    }
    blocks.push(block);
    sum += block.usedLength;
    if (sum > totalRam) {
      throw fail(
        `RAM block used lengths add up to ${sum} bytes, more than the total RAM size ${totalRam} (at block "${block.name}")`,
        { block: block.name, recordOffset: pos, sum, totalRam },
      );
    }
    pos = block.pagesOffset + block.usedLength;
  }
  // The stream goes on with a be64 RAM flag (EOS), whose first byte is 0; a non-zero byte there is
  // another block's name length, i.e. the total stopped short of the blocks actually written.
  if (pos < fileSize && r.u8(pos, "end of the RAM block records") !== 0) {
    const last = blocks[blocks.length - 1]!;
    throw fail(
      `RAM block used lengths reach the total RAM size ${totalRam} at block "${last.name}", ` +
        `but another RAM block record follows at ${hex(pos)}`,
      { block: last.name, recordOffset: pos, totalRam },
    );
  }
  return { path, fileSize, totalRam, ramSectionOffset, ignoreShared, blocks };
}

function parseBlock(
  r: HeaderReader,
  recordOffset: number,
  state: { sum: number; totalRam: number; ignoreShared: boolean },
): MappedRamBlockInfo {
  const { path, fileSize } = r;
  let ctx: Record<string, unknown> = { recordOffset };
  const fail = (msg: string, extra: Record<string, unknown> = {}) =>
    new ImageError(`${path}: ${msg}`, { path, ...ctx, ...extra });

  const nameLen = r.u8(recordOffset, "RAM block name length", ctx);
  if (nameLen === 0) {
    throw fail(
      `RAM block used lengths add up to ${state.sum} bytes but the total RAM size is ${state.totalRam}: ` +
        `no further RAM block record at ${hex(recordOffset)}`,
      { sum: state.sum, totalRam: state.totalRam },
    );
  }
  const name = new TextDecoder().decode(r.view(recordOffset + 1, nameLen, `RAM block name (${nameLen} bytes)`, ctx));
  ctx = { block: name, recordOffset };
  const usedAt = recordOffset + 1 + nameLen;
  const usedLength = r.be64(usedAt, "RAM block used_length", ctx);
  if (usedLength === 0) throw fail(`RAM block "${name}" has used_length 0`);
  checkImageSize(usedLength, path, `RAM block "${name}": used_length`, ctx);

  // Optional fields before the header: a be64 page size (postcopy-ram with huge pages) and a
  // be64 address (x-ignore-shared). Take the first candidate that looks like QEMU's header.
  const after = usedAt + 8;
  const candidates = state.ignoreShared ? [after + 8, after + 16] : [after, after + 8];
  let headerOffset = candidates[0]!;
  for (const c of candidates) {
    if (c + HEADER_SIZE > fileSize) break;
    const v = r.view(c, HEADER_SIZE, "MappedRamHeader", ctx);
    const dv = new DataView(v.buffer, v.byteOffset, HEADER_SIZE);
    if (dv.getUint32(0, false) === HEADER_VERSION && dv.getBigUint64(12, false) === BigInt(c + HEADER_SIZE)) {
      headerOffset = c;
      break;
    }
  }
  ctx = { ...ctx, headerOffset };
  const hdrVersion = r.be32(headerOffset, "MappedRamHeader", ctx);
  if (hdrVersion !== HEADER_VERSION) {
    throw fail(`RAM block "${name}": unsupported MappedRamHeader version ${hdrVersion} (expected ${HEADER_VERSION})`);
  }
  const pageSize = r.be64(headerOffset + 4, "MappedRamHeader page_size", ctx);
  const bitmapOffset = r.be64(headerOffset + 12, "MappedRamHeader bitmap_offset", ctx);
  const pagesOffset = r.be64(headerOffset + 20, "MappedRamHeader pages_offset", ctx);
  ctx = { ...ctx, pageSize, bitmapOffset, pagesOffset, usedLength };

  if (pageSize === 0 || (pageSize & (pageSize - 1)) !== 0 || pageSize > 2 ** 30) {
    throw fail(`RAM block "${name}": page size ${pageSize} is not a power of two`);
  }
  if (pageSize % IMAGE_PAGE !== 0) {
    throw fail(`RAM block "${name}": page size ${pageSize} is smaller than ${IMAGE_PAGE} (not supported)`);
  }
  if (usedLength % pageSize !== 0) {
    throw fail(`RAM block "${name}": used_length ${usedLength} is not a multiple of its page size ${pageSize}`);
  }
  const pages = usedLength / pageSize;
  const bitmapBytes = Math.ceil(pages / 8);
  if (bitmapOffset < headerOffset + HEADER_SIZE) {
    throw fail(`RAM block "${name}": bitmap_offset ${hex(bitmapOffset)} points into the block's own header`);
  }
  if (bitmapOffset + bitmapBytes > fileSize) {
    throw fail(
      `RAM block "${name}": bitmap ${hex(bitmapOffset)}..${hex(bitmapOffset + bitmapBytes)} ends past the end of the file ` +
        `at ${hex(fileSize)} (truncated file?)`,
      { fileSize },
    );
  }
  if (pagesOffset % PAGES_ALIGN !== 0) {
    throw fail(`RAM block "${name}": pages_offset ${hex(pagesOffset)} is not aligned to 1 MiB`);
  }
  if (pagesOffset < bitmapOffset + bitmapBytes) {
    throw fail(`RAM block "${name}": pages_offset ${hex(pagesOffset)} overlaps its bitmap at ${hex(bitmapOffset)}`);
  }
  if (pagesOffset > fileSize) {
    throw fail(`RAM block "${name}": pages_offset ${hex(pagesOffset)} is past the end of the file at ${hex(fileSize)}`, {
      fileSize,
    });
  }
  if (!Number.isSafeInteger(pagesOffset + usedLength)) throw fail(`RAM block "${name}": pages area out of range`);

  const { set, last } = scanBitmap(r, bitmapOffset, pages, ctx);
  if (last >= 0 && pagesOffset + (last + 1) * pageSize > fileSize) {
    throw fail(
      `RAM block "${name}": page ${last} is marked present but ends at ${hex(pagesOffset + (last + 1) * pageSize)}, ` +
        `past the end of the file at ${hex(fileSize)} (truncated file?)`,
      { page: last, fileSize },
    );
  }
  return {
    name,
    usedLength,
    pageSize,
    recordOffset,
    headerOffset,
    bitmapOffset,
    pagesOffset,
    pages,
    dataPages: set,
    zeroPages: pages - set,
  };
}

/** Walks the first `pages` bits of a bitmap (bits past them are ignored) a window at a time. */
function forEachBitmapChunk(
  r: HeaderReader,
  bitmapOffset: number,
  pages: number,
  ctx: Record<string, unknown>,
  fn: (bytes: Uint8Array, firstPage: number) => void,
): void {
  const bytes = Math.ceil(pages / 8);
  for (let done = 0; done < bytes; ) {
    const n = Math.min(WINDOW, bytes - done);
    fn(r.view(bitmapOffset + done, n, "page bitmap", ctx), done * 8);
    done += n;
  }
}

/** Masks off bits of `byte` (covering pages firstPage..+8) that lie at or past `pages`. */
function maskTail(byte: number, firstPage: number, pages: number): number {
  const valid = pages - firstPage;
  return valid >= 8 ? byte : byte & ((1 << valid) - 1);
}

const POPCOUNT8 = Uint8Array.from({ length: 256 }, (_, i) => {
  let n = 0;
  for (let x = i; x; x >>= 1) n += x & 1;
  return n;
});

function scanBitmap(r: HeaderReader, bitmapOffset: number, pages: number, ctx: Record<string, unknown>) {
  let set = 0;
  let last = -1;
  forEachBitmapChunk(r, bitmapOffset, pages, ctx, (bytes, firstPage) => {
    for (let i = 0; i < bytes.length; i++) {
      const page = firstPage + i * 8;
      const b = maskTail(bytes[i]!, page, pages);
      if (b === 0) continue;
      set += POPCOUNT8[b]!;
      last = page + 31 - Math.clz32(b);
    }
  });
  return { set, last };
}

/** Expands the block's bitmap into 4 KiB zero pages (bit 0 = a zero page of `pageSize` bytes). */
function readZeroMap(fd: number | Pread, fileSize: number, path: string, block: MappedRamBlockInfo): ZeroMap {
  const zero = new ZeroMap(block.usedLength / IMAGE_PAGE);
  const ratio = block.pageSize / IMAGE_PAGE;
  const r = new HeaderReader(fd, path, fileSize);
  try {
    forEachBitmapChunk(r, block.bitmapOffset, block.pages, { block: block.name }, (bytes, firstPage) => {
      for (let i = 0; i < bytes.length; i++) {
        const page = firstPage + i * 8;
        const valid = Math.min(8, block.pages - page);
        const b = bytes[i]!;
        if (b === 0 && valid === 8) {
          zero.setZeroRange(page * ratio, 8 * ratio);
          continue;
        }
        if (b === 0xff) continue;
        for (let j = 0; j < valid; j++) if (((b >>> j) & 1) === 0) zero.setZeroRange((page + j) * ratio, ratio);
      }
    });
  } finally {
    r.free();
  }
  return zero;
}

/** Offset in `head` of: 0x01, be32 section id, u8 3, "ram", be32 instance, be32 version; or -1. */
function findRamSection(head: Uint8Array): number {
  for (let i = 0; i + 17 <= head.length; i++) {
    if (
      head[i] === SECTION_START &&
      head[i + 5] === 3 &&
      head[i + 6] === 0x72 && // r
      head[i + 7] === 0x61 && // a
      head[i + 8] === 0x6d // m
    ) {
      return i;
    }
  }
  return -1;
}

/** Capabilities are stored as u8 length + name in the configuration section. */
function hasCapability(config: Uint8Array, cap: string): boolean {
  const needle = new Uint8Array([cap.length, ...new TextEncoder().encode(cap)]);
  outer: for (let i = 0; i + needle.length <= config.length; i++) {
    for (let j = 0; j < needle.length; j++) if (config[i + j] !== needle[j]) continue outer;
    return true;
  }
  return false;
}
