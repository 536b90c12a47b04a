// Working-set files: the order in which a VM first touched image pages, recorded once and
// prefetched on every later restore (REAP's idea). Only the ORDER comes from this file —
// page bytes always come from the image — so a bad file can cost speed, never correctness.
//
// Layout, little-endian: "SLWS", u32 version (1), u32 page size (4096), u32 count,
// u64 image size, count x u32 image page index, u32 CRC-32 of everything before it.
import { renameSync, writeFileSync } from "node:fs";
import { SnaploadError } from "../core/errors.ts";
import { IMAGE_PAGE } from "../sources/image/snapshot-image.ts";

const MAGIC = 0x53574c53; // "SLWS"
const VERSION = 1;
const HEADER = 24;

export class WorkingSetError extends SnaploadError {
  constructor(message: string, context: Record<string, unknown> = {}) {
    super("BAD_WORKING_SET", message, context);
    this.name = "WorkingSetError";
  }
}

/** First-touch order of one VM, in image pages; grows without per-fault allocation. */
export class TouchRecorder {
  private pages = new Uint32Array(4096);
  private seen: Uint8Array;
  length = 0;

  constructor(imagePages: number) {
    this.seen = new Uint8Array(imagePages);
  }

  add(imagePage: number): void {
    if (this.seen[imagePage]) return;
    this.seen[imagePage] = 1;
    if (this.length === this.pages.length) {
      const grown = new Uint32Array(this.pages.length * 2);
      grown.set(this.pages);
      this.pages = grown;
    }
    this.pages[this.length++] = imagePage;
  }

  get order(): Uint32Array {
    return this.pages.subarray(0, this.length);
  }
}

export function encodeWorkingSet(order: Uint32Array, imageSize: number): Uint8Array {
  const out = new Uint8Array(HEADER + order.length * 4 + 4);
  const v = new DataView(out.buffer);
  v.setUint32(0, MAGIC, true);
  v.setUint32(4, VERSION, true);
  v.setUint32(8, IMAGE_PAGE, true);
  v.setUint32(12, order.length, true);
  v.setBigUint64(16, BigInt(imageSize), true);
  for (let i = 0; i < order.length; i++) v.setUint32(HEADER + i * 4, order[i]!, true);
  v.setUint32(out.length - 4, Bun.hash.crc32(out.subarray(0, out.length - 4)), true);
  return out;
}

/** Writes atomically (temp file + rename), so a crash never leaves half a file behind. */
export function writeWorkingSet(path: string, order: Uint32Array, imageSize: number): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, encodeWorkingSet(order, imageSize));
  renameSync(tmp, path);
}

export function decodeWorkingSet(bytes: Uint8Array, imageSize: number, path = "working set"): Uint32Array {
  if (bytes.length < HEADER + 4) throw new WorkingSetError(`${path}: too short to be a working-set file (${bytes.length} bytes)`, { path });
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (v.getUint32(0, true) !== MAGIC) throw new WorkingSetError(`${path}: not a working-set file (bad magic)`, { path });
  const version = v.getUint32(4, true);
  if (version !== VERSION) throw new WorkingSetError(`${path}: working-set version ${version} is not supported`, { path });
  const pageSize = v.getUint32(8, true);
  if (pageSize !== IMAGE_PAGE) throw new WorkingSetError(`${path}: page size ${pageSize}, expected ${IMAGE_PAGE}`, { path });
  const count = v.getUint32(12, true);
  if (bytes.length !== HEADER + count * 4 + 4) {
    throw new WorkingSetError(`${path}: ${bytes.length} bytes, but the header promises ${count} pages`, { path });
  }
  const crc = Bun.hash.crc32(bytes.subarray(0, bytes.length - 4));
  if (crc !== v.getUint32(bytes.length - 4, true)) throw new WorkingSetError(`${path}: checksum mismatch (corrupt file)`, { path });
  const recordedSize = Number(v.getBigUint64(16, true));
  if (recordedSize !== imageSize) {
    throw new WorkingSetError(`${path}: recorded from an image of ${recordedSize} bytes, serving one of ${imageSize}`, { path });
  }
  const pages = Math.ceil(imageSize / IMAGE_PAGE);
  const order = new Uint32Array(count);
  for (let i = 0; i < count; i++) {
    const p = v.getUint32(HEADER + i * 4, true);
    if (p >= pages) throw new WorkingSetError(`${path}: page ${p} is beyond the image (${pages} pages)`, { path });
    order[i] = p;
  }
  return order;
}

export async function readWorkingSet(path: string, imageSize: number): Promise<Uint32Array> {
  const file = Bun.file(path);
  if (!(await file.exists())) throw new WorkingSetError(`${path}: working-set file not found`, { path });
  return decodeWorkingSet(new Uint8Array(await file.arrayBuffer()), imageSize, path);
}
