// The handler table: each region the VMM registered, mapped to the backend that supplies its
// pages, with the per-page state that outlives one fault (installed, in flight, discarded).
import type { RegionMapping } from "../sinks/uffd/handshake.ts";
import { IMAGE_PAGE } from "../sources/image/snapshot-image.ts";
import { PAGE_INSTALLED, PAGE_REMOVED, type PageBackend, type PageRegion, type PageTableView } from "../sources/port.ts";

export { PAGE_IN_FLIGHT, PAGE_INSTALLED, PAGE_MISSING, PAGE_REMOVED } from "../sources/port.ts";

export class Region implements PageRegion {
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

export class HandlerTable implements PageTableView {
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
