// qemu-restore from a snapshot that is not a local file: the mapped-ram file's bytes as a page
// server or an object store serves them (the file served or pushed whole). The parts that are
// not pages (configuration, block records and bitmaps, device state) are read first, in a few
// round trips; the pages are fetched as the guest asks for them and as the background sweeps,
// and handed to the sink only once present and verified.
import type { Pread } from "../../sources/image/mapped-ram.ts";
import type { MappedRamBlockInfo } from "../../sources/image/snapshot-image.ts";
import { blockZeroMapFrom } from "../../sources/image/mapped-ram.ts";
import type { ZeroMap } from "../../sources/image/snapshot-image.ts";
import type { BlockPages, PageArrivals } from "./page-sink.ts";
import { readDeviceStateFrom, readSnapshotStreamFrom, type SnapshotStream } from "./snapshot-stream.ts";
import { TARGET_PAGE } from "./stream.ts";
import type { RemoteFile } from "../../sources/remote-file.ts";

/** Bytes fetched per miss while the non-page parts are parsed. */
const META_CHUNK = 64 * 1024;

class NeedBytes {
  constructor(readonly chunks: number[]) {}
}

export interface RemoteSnapshot {
  stream: SnapshotStream;
  deviceState: Uint8Array;
  zero: ZeroMap[];
}

/**
 * Parses the snapshot through a reader that throws for bytes not fetched yet; each miss fetches
 * what the failed read needed and the parse starts over (parsing is cheap; round trips are not,
 * and there are a few dozen at most: header, block records, bitmaps, device state, its tail).
 */
export async function readRemoteSnapshot(file: RemoteFile): Promise<RemoteSnapshot> {
  const have = new Map<number, Uint8Array>();
  const read: Pread = (into, len, off) => {
    const end = Math.min(off + len, file.size);
    if (end <= off) return 0;
    const missing: number[] = [];
    for (let c = Math.floor(off / META_CHUNK); c * META_CHUNK < end; c++) if (!have.has(c)) missing.push(c);
    if (missing.length) throw new NeedBytes(missing);
    for (let o = off; o < end; ) {
      const c = Math.floor(o / META_CHUNK);
      const chunk = have.get(c)!;
      const from = o - c * META_CHUNK;
      const n = Math.min(end - o, chunk.length - from);
      into.set(chunk.subarray(from, from + n), o - off);
      o += n;
    }
    return end - off;
  };
  for (;;) {
    try {
      const stream = readSnapshotStreamFrom(read, file.size, file.description);
      if (stream.refusals.length > 0) return { stream, deviceState: new Uint8Array(0), zero: [] };
      const deviceState = readDeviceStateFrom(read, file.size, stream);
      const zero = stream.ram.blocks.map((b) => blockZeroMapFrom(read, file.size, file.description, b));
      return { stream, deviceState, zero };
    } catch (e) {
      if (!(e instanceof NeedBytes)) throw e;
      await Promise.all(
        e.chunks.map(async (c) => {
          const off = c * META_CHUNK;
          const len = Math.ceil(Math.min(META_CHUNK, file.size - off) / TARGET_PAGE) * TARGET_PAGE;
          have.set(c, (await file.read(off, len, true)).subarray(0, Math.min(META_CHUNK, file.size - off)));
        }),
      );
    }
  }
}

/** BlockPages over a remote file: a page is present from its arrival until it is sent. */
export function remotePages(file: RemoteFile, blocks: readonly MappedRamBlockInfo[], zero: ZeroMap[], arrivals: PageArrivals): BlockPages {
  const present = blocks.map(() => new Map<number, Uint8Array>());
  let failed = false;
  return {
    zero,
    bytes: (bi, page) => present[bi]!.get(page),
    fetch: (bi, first, count, urgent) => {
      const b = blocks[bi]!;
      file.read(b.pagesOffset + first * TARGET_PAGE, count * TARGET_PAGE, urgent).then(
        (bytes) => {
          if (failed) return;
          const map = present[bi]!;
          for (let i = 0; i < count; i++) if (!map.has(first + i)) map.set(first + i, bytes.subarray(i * TARGET_PAGE, (i + 1) * TARGET_PAGE));
          arrivals.arrived(bi, first, count);
        },
        (e: Error) => {
          if (failed) return;
          failed = true;
          arrivals.fail(e);
        },
      );
    },
    sent: (bi, page) => void present[bi]!.delete(page),
  };
}
