// The snapshot store format, version 1 (docs/store-format.md): fixed-size chunks, each
// compressed on its own and named by the SHA-256 of its uncompressed bytes, and one manifest per
// snapshot that carries the hash of its own body. Everything read from a store is checked here
// before anything else sees it.
import { z } from "zod";
import { IMAGE_PAGE, ZeroMap } from "../image/snapshot-image.ts";
import { StoreError } from "./errors.ts";
import { zstdDecompressInto } from "./zstd.ts";

export const STORE_FORMAT_VERSION = 1;
/**
 * Manifests of a QEMU snapshot file pushed whole (`push --whole-file`, source "qemu-file": pages
 * AND device state, for qemu-restore). Version 1 manifests stay as they were; a reader that
 * knows only version 1 refuses these by their version, instead of serving a file's bytes as RAM.
 */
export const WHOLE_FILE_FORMAT_VERSION = 2;
const READABLE_VERSIONS = [STORE_FORMAT_VERSION, WHOLE_FILE_FORMAT_VERSION];
/**
 * Chosen by bench/store-chunks.ts (README, "Snapshot stores"): the same stored bytes as larger
 * chunks, but a second snapshot uploads 2-3x less and a cold restore fetches ~half the bytes.
 */
export const DEFAULT_CHUNK_SIZE = 256 * 1024;
/** zstd level, chosen by the same bench: levels 3 and 9 store no fewer bytes and compress 1.5-2x slower. */
export const DEFAULT_ZSTD_LEVEL = 1;
export const CHUNK_SIZES = [256 * 1024, 1024 * 1024, 2 * 1024 * 1024, 4 * 1024 * 1024] as const;

const CHUNK_MAGIC = 0x31434c53; // "SLC1" little-endian
export const CHUNK_HEADER = 12;
export const CODEC_RAW = 0;
export const CODEC_ZSTD = 1;
/** Compression must save at least this fraction, or the chunk is stored raw (decoding raw costs nothing). */
const MIN_SAVING = 1 / 16;

const MANIFEST_MAGIC = "snapload-manifest";
const HEX64 = /^[0-9a-f]{64}$/;
/** Store object names: what `STORE/NAME` may say after the store. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function sha256(bytes: Uint8Array): string {
  return new Bun.CryptoHasher("sha256").update(bytes).digest("hex");
}

export function chunkKey(hash: string): string {
  return `chunks/${hash.slice(0, 2)}/${hash}`;
}

export function manifestKey(name: string): string {
  return `snapshots/${name}`;
}

export function isAllZero(bytes: Uint8Array): boolean {
  // 8 bytes at a time where aligned; the tail byte by byte.
  const words = Math.floor(bytes.byteLength / 8);
  if (bytes.byteOffset % 8 === 0) {
    const w = new BigUint64Array(bytes.buffer, bytes.byteOffset, words);
    for (let i = 0; i < words; i++) if (w[i] !== 0n) return false;
    for (let i = words * 8; i < bytes.length; i++) if (bytes[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** Chunk object: "SLC1", u8 codec, 3 bytes 0, u32 LE uncompressed length, payload. */
export function encodeChunk(bytes: Uint8Array, level: number): { object: Uint8Array; codec: number } {
  const packed = Bun.zstdCompressSync(bytes, { level });
  const zstd = packed.length <= bytes.length * (1 - MIN_SAVING);
  const payload = zstd ? packed : bytes;
  const object = new Uint8Array(CHUNK_HEADER + payload.length);
  const v = new DataView(object.buffer);
  v.setUint32(0, CHUNK_MAGIC, true);
  object[4] = zstd ? CODEC_ZSTD : CODEC_RAW;
  v.setUint32(8, bytes.length, true);
  object.set(payload, CHUNK_HEADER);
  return { object, codec: object[4]! };
}

/**
 * Decodes a chunk object and checks it against the name it was fetched by and the length the
 * manifest expects. Throws BAD_CHUNK: such bytes must never reach a guest. With `into` (at least
 * `length` bytes), a zstd chunk is decompressed there when libzstd is at hand (see zstd.ts); the
 * result is then a view of `into`.
 */
export function decodeChunk(object: Uint8Array, hash: string, length: number, where: string, into?: Uint8Array): Uint8Array {
  // `contentHash`: set when the chunk decoded but its bytes are not the ones named.
  const bad = (why: string, contentHash?: string) => new StoreError("BAD_CHUNK", `chunk ${hash.slice(0, 16)}… from ${where}: ${why}`, { hash, where, ...(contentHash ? { contentHash } : {}) });
  if (object.length < CHUNK_HEADER) throw bad(`${object.length} bytes, shorter than a chunk header`);
  const v = new DataView(object.buffer, object.byteOffset, object.byteLength);
  if (v.getUint32(0, true) !== CHUNK_MAGIC) throw bad("not a snapload chunk (bad magic)");
  const ulen = v.getUint32(8, true);
  if (ulen !== length) throw bad(`holds ${ulen} bytes, the manifest expects ${length}`);
  const payload = object.subarray(CHUNK_HEADER);
  let bytes: Uint8Array;
  if (object[4] === CODEC_RAW) bytes = payload;
  else if (object[4] === CODEC_ZSTD) {
    const n = into !== undefined ? zstdDecompressInto(payload, into.subarray(0, length)) : undefined;
    if (n === -1) throw bad("zstd data does not decompress (corrupt, or larger than the manifest says)");
    if (n !== undefined) bytes = into!.subarray(0, n);
    else {
      try {
        bytes = Bun.zstdDecompressSync(payload);
      } catch (e) {
        throw bad(`zstd data does not decompress (${(e as Error).message})`);
      }
    }
  } else throw bad(`unknown codec ${object[4]}`);
  if (bytes.length !== length) throw bad(`decompresses to ${bytes.length} bytes, the manifest expects ${length}`);
  const got = sha256(bytes);
  if (got !== hash) throw bad(`content hashes to ${got.slice(0, 16)}…: corrupt, not installed`, got);
  return bytes;
}

// ---- manifest ---------------------------------------------------------------------------------

const blockSchema = z.object({ name: z.string(), usedLength: z.number().int().nonnegative(), pageSize: z.number().int().positive() });

const manifestSchema = z.object({
  format: z.union([z.literal(STORE_FORMAT_VERSION), z.literal(WHOLE_FILE_FORMAT_VERSION)]),
  name: z.string().regex(NAME_RE),
  created: z.string(),
  image: z.object({
    /** Bytes a region offset can address: the raw file, or the pushed mapped-ram block. */
    size: z.number().int().positive().max(Number.MAX_SAFE_INTEGER),
    pageSize: z.literal(IMAGE_PAGE),
    source: z.enum(["raw", "mapped-ram", "qemu-file"]),
    /** mapped-ram: the block pushed, its page size, and every block of the file (geometry). */
    block: z.string().optional(),
    blockPageSize: z.number().int().positive().optional(),
    blocks: z.array(blockSchema).optional(),
  }),
  chunkSize: z.number().int().refine((n) => n >= 64 * 1024 && n <= 64 * 1024 * 1024 && (n & (n - 1)) === 0, "must be a power of two between 64 KiB and 64 MiB"),
  compression: z.object({ codec: z.literal("zstd"), level: z.number().int() }),
  /** One bit per 4 KiB page, LSB first, base64: 1 = all zero (installed as a zero page, never fetched). */
  zero: z.string(),
  /** SHA-256 of each chunk's uncompressed bytes, or null for a chunk whose pages are all zero. */
  chunks: z.array(z.string().regex(HEX64).nullable()),
  /** Bytes of each chunk object as stored (0 for null chunks). */
  stored: z.array(z.number().int().nonnegative()),
  /** Optional recorded working set: image page indexes in first-touch order, u32 LE, base64. */
  workingSet: z.string().optional(),
});

export type ManifestBody = z.output<typeof manifestSchema>;

export interface Manifest {
  body: ManifestBody;
  /** SHA-256 of the body bytes (the manifest's identity). */
  hash: string;
  zero: ZeroMap;
  workingSet: Uint32Array | undefined;
}

export function chunkCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

/** Uncompressed length of chunk i (the last one may be short). */
export function chunkLength(size: number, chunkSize: number, i: number): number {
  return Math.min(chunkSize, size - i * chunkSize);
}

export function zeroMapToBase64(zero: ZeroMap): string {
  const bytes = new Uint8Array(Math.ceil(zero.pages / 8));
  for (let p = 0; p < zero.pages; p++) if (zero.isZero(p)) bytes[p >>> 3]! |= 1 << (p & 7);
  return Buffer.from(bytes).toString("base64");
}

function zeroMapFromBytes(bytes: Uint8Array, pages: number): ZeroMap {
  const zero = new ZeroMap(pages);
  for (let p = 0; p < pages; p++) if ((bytes[p >>> 3]! >>> (p & 7)) & 1) zero.setZero(p);
  return zero;
}

export function encodeManifest(body: ManifestBody): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(body));
  const head = new TextEncoder().encode(`${MANIFEST_MAGIC} ${body.format} sha256:${sha256(json)}\n`);
  const out = new Uint8Array(head.length + json.length);
  out.set(head);
  out.set(json, head.length);
  return out;
}

/** Parses and checks a manifest: its hash, its schema, and that chunks, zero map and size agree. */
export function decodeManifest(bytes: Uint8Array, where: string): Manifest {
  const bad = (why: string) => new StoreError("BAD_MANIFEST", `manifest ${where}: ${why}`, { where });
  const nl = bytes.indexOf(0x0a);
  if (nl < 0 || nl > 200) throw bad("not a snapload manifest (no header line)");
  const head = new TextDecoder().decode(bytes.subarray(0, nl)).split(" ");
  if (head[0] !== MANIFEST_MAGIC) throw bad("not a snapload manifest (bad header)");
  if (!READABLE_VERSIONS.map(String).includes(head[1] ?? "")) throw bad(`format version ${head[1]} is not supported (this snapload reads versions ${READABLE_VERSIONS.join(" and ")})`);
  const json = bytes.subarray(nl + 1);
  const hash = sha256(json);
  if (head[2] !== `sha256:${hash}`) throw bad(`body hashes to ${hash.slice(0, 16)}…, the header says ${head[2]?.slice(7, 23)}…: corrupt or truncated`);
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(json));
  } catch (e) {
    throw bad(`body is not JSON (${(e as Error).message})`);
  }
  const r = manifestSchema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw bad(`${issue.path.join(".") || "body"}: ${issue.message}`);
  }
  const body = r.data;
  if (String(body.format) !== head[1]) throw bad(`body says format ${body.format}, the header ${head[1]}`);
  if ((body.image.source === "qemu-file") !== (body.format === WHOLE_FILE_FORMAT_VERSION)) {
    throw bad(`a "${body.image.source}" image in a format ${body.format} manifest (whole QEMU files are format ${WHOLE_FILE_FORMAT_VERSION}, images format ${STORE_FORMAT_VERSION})`);
  }
  const pages = Math.ceil(body.image.size / IMAGE_PAGE);
  const n = chunkCount(body.image.size, body.chunkSize);
  if (body.chunks.length !== n || body.stored.length !== n) throw bad(`${body.chunks.length} chunks listed, an image of ${body.image.size} bytes in ${body.chunkSize}-byte chunks has ${n}`);
  const zeroBytes = Buffer.from(body.zero, "base64");
  if (zeroBytes.length !== Math.ceil(pages / 8)) throw bad(`zero map has ${zeroBytes.length} bytes, expected ${Math.ceil(pages / 8)}`);
  const zero = zeroMapFromBytes(zeroBytes, pages);
  const perChunk = body.chunkSize / IMAGE_PAGE;
  for (let i = 0; i < n; i++) {
    const first = i * perChunk;
    const allZero = zero.isRangeZero(first, Math.min(perChunk, pages - first));
    if (allZero !== (body.chunks[i] === null)) throw bad(`chunk ${i} ${allZero ? "has a hash but every page of it is zero" : "is missing but holds data pages"}`);
  }
  let workingSet: Uint32Array | undefined;
  if (body.workingSet !== undefined) {
    const b = Buffer.from(body.workingSet, "base64");
    if (b.length % 4 !== 0) throw bad("working set is not a list of u32 page indexes");
    workingSet = new Uint32Array(b.length / 4);
    const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
    for (let i = 0; i < workingSet.length; i++) {
      const p = v.getUint32(i * 4, true);
      if (p >= pages) throw bad(`working set names page ${p}, beyond the image's ${pages} pages`);
      workingSet[i] = p;
    }
  }
  return { body, hash, zero, workingSet };
}

export function encodeWorkingSetField(order: Uint32Array): string {
  const b = Buffer.alloc(order.length * 4);
  for (let i = 0; i < order.length; i++) b.writeUInt32LE(order[i]!, i * 4);
  return b.toString("base64");
}
