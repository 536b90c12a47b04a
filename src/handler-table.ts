// The handler table: each region the VMM registered, mapped to the backend that supplies its
// pages, with the per-page state that outlives one fault (installed, discarded by the guest).
import type { RegionMapping } from "./handshake.ts";
import type { ZeroMap } from "./image/snapshot-image.ts";
import { IMAGE_PAGE } from "./image/snapshot-image.ts";

/** Where a region's bytes come from. `image`: all bytes are mapped locally at `base`. */
export interface PageBackend {
  readonly kind: "image" | "remote";
  /** Bytes addressable by a region offset. */
  readonly size: number;
  /** 4 KiB pages the snapshot says are zero: installed as zero pages, never read. */
  readonly zero: ZeroMap;
  /** For `image`: address of image byte 0 in our memory. */
  readonly base: number;
  /** True when bytes of zero pages also read as zero through `base` (raw holes do; mapped-ram may not). */
  readonly zeroBytesAreZero: boolean;
  readonly description: string;
}

export const PAGE_MISSING = 0;
export const PAGE_INSTALLED = 1;
/** The guest discarded it (UFFD_EVENT_REMOVE): it reads as zeros from now on, never as snapshot data. */
export const PAGE_REMOVED = 2;

export class Region {
  readonly base: number;
  readonly size: number;
  readonly end: number;
  readonly pageSize: number;
  readonly offset: number;
  readonly pages: number;
  /** One byte per region page: PAGE_MISSING / PAGE_INSTALLED / PAGE_REMOVED. */
  readonly state: Uint8Array;
  /** Image pages (4 KiB) per region page. */
  readonly imagePagesPerPage: number;
  /** Pages no longer PAGE_MISSING; when it reaches `pages`, the region needs nothing more. */
  settled = 0;

  constructor(
    readonly index: number,
    mapping: RegionMapping,
    readonly backend: PageBackend,
  ) {
    this.base = mapping.base;
    this.size = mapping.size;
    this.end = mapping.base + mapping.size;
    this.pageSize = mapping.pageSize;
    this.offset = mapping.offset;
    this.pages = mapping.size / mapping.pageSize;
    this.state = new Uint8Array(this.pages);
    this.imagePagesPerPage = mapping.pageSize / IMAGE_PAGE;
  }

  /** True when region page i is all zero in the snapshot. */
  isZeroPage(i: number): boolean {
    const first = (this.offset + i * this.pageSize) / IMAGE_PAGE;
    if (this.imagePagesPerPage === 1) return this.backend.zero.isZero(first);
    return this.backend.zero.isRangeZero(first, this.imagePagesPerPage);
  }

  /** True when region page i mixes zero and data image pages (matters only for 2 MiB pages). */
  isMixedPage(i: number): boolean {
    if (this.imagePagesPerPage === 1) return false;
    const first = (this.offset + i * this.pageSize) / IMAGE_PAGE;
    const z = this.backend.zero;
    let zeros = 0;
    for (let k = 0; k < this.imagePagesPerPage; k++) if (z.isZero(first + k)) zeros++;
    return zeros > 0 && zeros < this.imagePagesPerPage;
  }

  setState(i: number, s: number): void {
    const old = this.state[i]!;
    if (old === s) return;
    if (old === PAGE_MISSING) this.settled++;
    else if (s === PAGE_MISSING) this.settled--;
    this.state[i] = s;
  }
}

export class HandlerTable {
  readonly regions: Region[];
  readonly totalPages: number;
  private last: Region | undefined;

  constructor(mappings: RegionMapping[], backend: PageBackend) {
    this.regions = mappings.map((m, i) => new Region(i, m, backend)).sort((a, b) => a.base - b.base);
    this.totalPages = this.regions.reduce((n, r) => n + r.pages, 0);
  }

  /** The region holding addr, or undefined. Faults cluster, so the last hit is tried first. */
  find(addr: number): Region | undefined {
    const last = this.last;
    if (last !== undefined && addr >= last.base && addr < last.end) return last;
    for (const r of this.regions) {
      if (addr >= r.base && addr < r.end) {
        this.last = r;
        return r;
      }
    }
    return undefined;
  }

  get settledPages(): number {
    let n = 0;
    for (const r of this.regions) n += r.settled;
    return n;
  }

  get bytes(): number {
    let n = 0;
    for (const r of this.regions) n += r.size;
    return n;
  }
}
