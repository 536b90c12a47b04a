// Installing pages into a VM: one UFFDIO_COPY / UFFDIO_ZEROPAGE per run of pages, and the
// bookkeeping of what each ioctl did (partial copies, pages someone installed first, a pending
// REMOVE). Page bytes go from our mapping or a receive buffer to the guest; JS never copies them.
// Every install returns what it did as a small integer (InstallOutcome, src/sources/port.ts).
import { toArrayBuffer, type Pointer } from "bun:ffi";
import { COPY_DONTWAKE, Errno, NativeBuffer, UFFD_MSG_SIZE } from "../../core/ffi.ts";
import { AGAIN, EXISTED, GONE, type InstallOutcome, INSTALLED, PAGE_IN_FLIGHT, PAGE_INSTALLED, PAGE_MISSING, PAGE_REMOVED, type PageRegion } from "../../sources/port.ts";
import { IMAGE_PAGE } from "../../sources/image/snapshot-image.ts";
import type { UffdKernel } from "./kernel.ts";

/** Buffers shared by every VM of one loop (the loop is single-threaded). */
export class Scratch {
  static readonly MAX_MSGS = 64;
  readonly msgs = new NativeBuffer(Scratch.MAX_MSGS * UFFD_MSG_SIZE);
  /** Out-parameter of sl_uffd_copy / sl_uffd_zeropage. */
  readonly done = new NativeBuffer(4096);
  /** 2 MiB of zeros: the source of zero pages on hugetlbfs, where UFFDIO_ZEROPAGE does not exist. */
  readonly zero2m = new NativeBuffer(2 * 1024 * 1024);
  /** Assembly area for a 2 MiB page that mixes data and zero pages of a mapped-ram image. */
  readonly staging = new NativeBuffer(2 * 1024 * 1024);
  /** Fault addresses of one batch, for coalescing neighbours. */
  readonly faults = new Float64Array(Scratch.MAX_MSGS);

  free(): void {
    this.msgs.free();
    this.done.free();
    this.zero2m.free();
    this.staging.free();
  }
}

/** How installed pages were asked for (metrics label `how`): index into PageInstaller.pages. */
export const HOW_FAULT = 0;
export const HOW_FAULT_AROUND = 1;
export const HOW_PREFETCH = 2;
export const HOW_BACKGROUND = 3;
export const HOW_NAMES = ["fault", "fault_around", "prefetch", "background"] as const;
/** What was installed (metrics label `kind`): image data, a zero page, a page the guest discarded. */
export const KIND_DATA = 0;
export const KIND_ZERO = 1;
export const KIND_REMOVED = 2;
export const KIND_NAMES = ["data", "zero", "removed"] as const;

export interface VmStats {
  faults: number;
  pagesInstalled: number;
  zeroPagesInstalled: number;
  prefetchedPages: number;
  populatedPages: number;
  bytesCopied: number;
  eexist: number;
  eagain: number;
  removes: number;
  /** Pages of the prefetch list the guest faulted on before the prefetch got to them. */
  prefetchLate: number;
}

export class PageInstaller {
  /** How the pages of the next installs were asked for (HOW_*), set by the caller. */
  how = HOW_BACKGROUND;
  /** With HOW_FAULT: region pages [faultLo, faultHi) faulted; the rest of a run is fault-around. */
  faultLo = 0;
  faultHi = 0;
  /** Pages installed, by how (HOW_*) x kind (KIND_*): [how * KIND_NAMES.length + kind]. */
  readonly pages = new Float64Array(HOW_NAMES.length * KIND_NAMES.length);

  /** Within one public call: an ioctl met EEXIST (folded into the call's outcome, never read outside). */
  private existed = false;
  /** Within one public call: what stopped it (set by afterInstall when it returns 0). */
  private stop: InstallOutcome = INSTALLED;

  constructor(
    private readonly uffd: number,
    private readonly scratch: Scratch,
    private readonly stats: VmStats,
    private readonly kernel: UffdKernel,
  ) {}

  /**
   * Installs region pages [first, first+count), all of one kind (zero or data), in one ioctl when
   * possible. EEXIST skips the existing page and goes on (EXISTED); EAGAIN stops (AGAIN: retry
   * after a drain); ENOENT/ESRCH stop (GONE); any other error stops with -errno.
   */
  installRun(region: PageRegion, first: number, count: number, zero: boolean, dontWake: boolean): InstallOutcome {
    const ps = region.pageSize;
    const kernel = this.kernel;
    this.existed = false;
    const mode = dontWake ? COPY_DONTWAKE : 0;
    const doneBuf = this.scratch.done;
    let k = first;
    const end = first + count;
    while (k < end) {
      const dst = region.base + k * ps;
      let len = (end - k) * ps;
      let r: number;
      const isZero = zero || region.state[k] === PAGE_REMOVED;
      if (isZero) {
        if (ps === IMAGE_PAGE) {
          r = kernel.zeropage(this.uffd, dst, len, mode, doneBuf.address);
        } else {
          len = ps; // hugetlbfs has no UFFDIO_ZEROPAGE: copy from our 2 MiB of zeros, one page at a time
          r = kernel.copy(this.uffd, dst, this.scratch.zero2m.address, len, mode, doneBuf.address);
        }
      } else {
        const backend = region.backend;
        // Data pages of a source that answers later come through installFrom, never from here.
        if (backend.kind !== "image") return -Errno.EINVAL;
        if (ps !== IMAGE_PAGE && !backend.zeroBytesAreZero && region.isMixedPage(k)) {
          len = ps;
          r = kernel.copy(this.uffd, dst, this.assembleMixed(region, backend.base, k), len, mode, doneBuf.address);
        } else {
          r = kernel.copy(this.uffd, dst, backend.base + region.offset + k * ps, len, mode, doneBuf.address);
        }
      }
      const step = this.afterInstall(region, k, len / ps, isZero, r);
      if (step === 0) return this.stop;
      k += step;
    }
    return this.existed ? EXISTED : INSTALLED;
  }

  /** Like installRun for data pages whose bytes are at src (not in the image mapping). */
  installFrom(region: PageRegion, first: number, count: number, src: number, dontWake: boolean): InstallOutcome {
    const ps = region.pageSize;
    this.existed = false;
    let k = first;
    while (k < first + count) {
      const r = this.kernel.copy(this.uffd, region.base + k * ps, src + (k - first) * ps, (first + count - k) * ps, dontWake ? COPY_DONTWAKE : 0, this.scratch.done.address);
      const step = this.afterInstall(region, k, first + count - k, false, r);
      if (step === 0) return this.stop;
      k += step;
    }
    return this.existed ? EXISTED : INSTALLED;
  }

  /** Books the result of one install ioctl. Returns pages to advance, or 0 to stop with `this.stop`. */
  private afterInstall(region: PageRegion, k: number, pages: number, zero: boolean, r: number): number {
    if (r === 0) {
      this.settle(region, k, pages, zero);
      return pages;
    }
    const ps = region.pageSize;
    const donePages = Math.floor(this.scratch.done.u64(0) / ps);
    if (donePages > 0) this.settle(region, k, donePages, zero);
    const err = -r;
    // A partial install reports EAGAIN with progress: go on from where it stopped.
    if (err === Errno.EAGAIN && donePages > 0) return donePages;
    if (err === Errno.EEXIST) {
      // Someone (a racing install, or the page was never gone) got there first.
      this.stats.eexist++;
      this.existed = true;
      if (region.state[k + donePages] !== PAGE_REMOVED) region.setState(k + donePages, PAGE_INSTALLED);
      return donePages + 1;
    }
    if (donePages > 0) return donePages;
    if (err === Errno.EAGAIN) this.stop = AGAIN;
    // ENOENT: the range is no longer registered (unmapped); ESRCH: the process is exiting.
    else if (err === Errno.ENOENT || err === Errno.ESRCH) this.stop = GONE;
    else this.stop = -err;
    return 0;
  }

  private settle(region: PageRegion, first: number, count: number, zero: boolean): void {
    const state = region.state;
    const pages = this.pages;
    const kind = zero ? KIND_ZERO : KIND_DATA;
    const row = this.how * KIND_NAMES.length;
    const split = this.how === HOW_FAULT;
    for (let k = first; k < first + count; k++) {
      const s = state[k];
      if (s === PAGE_MISSING || s === PAGE_IN_FLIGHT) region.setState(k, PAGE_INSTALLED);
      const r = split && (k < this.faultLo || k >= this.faultHi) ? HOW_FAULT_AROUND * KIND_NAMES.length : row;
      pages[r + (s === PAGE_REMOVED ? KIND_REMOVED : kind)]!++;
    }
    this.stats.pagesInstalled += count;
    if (zero) this.stats.zeroPagesInstalled += count;
    else this.stats.bytesCopied += count * region.pageSize;
  }

  /** Builds a 2 MiB page whose zero 4 KiB pages must not come from the file (mapped-ram). */
  private assembleMixed(region: PageRegion, base: number, k: number): number {
    const st = this.scratch.staging;
    const firstImage = region.firstImagePage + k * region.imagePagesPerPage;
    const src = new Uint8Array(toArrayBuffer((base + region.offset + k * region.pageSize) as Pointer, 0, region.pageSize));
    for (let p = 0; p < region.imagePagesPerPage; p++) {
      const off = p * IMAGE_PAGE;
      if (region.backend.zero.isZero(firstImage + p)) st.bytes.fill(0, off, off + IMAGE_PAGE);
      else st.bytes.set(src.subarray(off, off + IMAGE_PAGE), off);
    }
    return st.address;
  }
}
