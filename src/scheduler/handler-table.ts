// The handler table: each region the VMM registered, mapped to the backend that supplies its
// pages, with the per-page state that outlives one fault (installed, in flight, discarded).
import type { RegionMapping } from "../sinks/uffd/handshake.ts";
import type { ZeroMap } from "../sources/image/snapshot-image.ts";
import { IMAGE_PAGE } from "../sources/image/snapshot-image.ts";

/** Asks a backend whose bytes are not local for pages; they arrive later through `PageSink`. */
export interface PageRequester {
  /**
   * Region pages [first, first+count) are wanted: all data pages, all PAGE_MISSING (the caller
   * marks them PAGE_IN_FLIGHT). `urgent` means a vCPU is waiting: send it before background work.
   */
  request(region: Region, first: number, count: number, urgent: boolean): void;
  /** A vCPU now waits on an in-flight page: move its request ahead of background traffic. */
  hurry(region: Region, page: number): void;
}

/** Where a region's bytes come from. */
export interface PageBackend {
  /** `image`: every byte is mapped locally at `base`. `remote`: bytes arrive later (postcopy). */
  readonly kind: "image" | "remote";
  /** Bytes addressable by a region offset. */
  readonly size: number;
  /** 4 KiB pages the snapshot says are zero: installed as zero pages, never read or fetched. */
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
/** Requested from a remote backend; its bytes have not arrived yet. */
export const PAGE_IN_FLIGHT = 3;

export class Region {
  readonly base: number;
  readonly size: number;
  readonly end: number;
  readonly pageSize: number;
  readonly offset: number;
  readonly pages: number;
  /** One byte per region page: PAGE_MISSING / PAGE_INSTALLED / PAGE_REMOVED / PAGE_IN_FLIGHT. */
  readonly state: Uint8Array;
  /** Image pages (4 KiB) per region page. */
  readonly imagePagesPerPage: number;
  /** Image page index of the region's first page. */
  readonly firstImagePage: number;
  /** Pages installed or removed: when it reaches `pages`, the region needs nothing more. */
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
    this.firstImagePage = mapping.offset / IMAGE_PAGE;
  }

  /** True when region page i is all zero in the snapshot. */
  isZeroPage(i: number): boolean {
    const first = this.firstImagePage + i * this.imagePagesPerPage;
    if (this.imagePagesPerPage === 1) return this.backend.zero.isZero(first);
    return this.backend.zero.isRangeZero(first, this.imagePagesPerPage);
  }

  /** True when region page i mixes zero and data image pages (only 2 MiB pages can). */
  isMixedPage(i: number): boolean {
    if (this.imagePagesPerPage === 1) return false;
    const first = this.firstImagePage + i * this.imagePagesPerPage;
    const z = this.backend.zero;
    return !z.isRangeZero(first, this.imagePagesPerPage) && !z.isRangeData(first, this.imagePagesPerPage);
  }

  setState(i: number, s: number): void {
    const old = this.state[i]!;
    if (old === s) return;
    const wasSettled = old === PAGE_INSTALLED || old === PAGE_REMOVED;
    const isSettled = s === PAGE_INSTALLED || s === PAGE_REMOVED;
    if (isSettled && !wasSettled) this.settled++;
    else if (wasSettled && !isSettled) this.settled--;
    this.state[i] = s;
  }

  /** The region page holding image page p, or -1 when the region does not map it. */
  pageOfImagePage(p: number): number {
    const rel = p - this.firstImagePage;
    if (rel < 0 || rel >= this.pages * this.imagePagesPerPage) return -1;
    return Math.floor(rel / this.imagePagesPerPage);
  }
}

export class HandlerTable {
  readonly regions: Region[];
  readonly totalPages: number;
  readonly bytes: number;
  private last: Region | undefined;

  constructor(mappings: RegionMapping[], backend: PageBackend) {
    this.regions = mappings.map((m, i) => new Region(i, m, backend)).sort((a, b) => a.base - b.base);
    this.totalPages = this.regions.reduce((n, r) => n + r.pages, 0);
    this.bytes = this.regions.reduce((n, r) => n + r.size, 0);
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

  get complete(): boolean {
    for (const r of this.regions) if (r.settled !== r.pages) return false;
    return true;
  }
}
