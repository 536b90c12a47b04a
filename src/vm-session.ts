// One connected VM: its uffd, its handler table, and the fault path.
// The fault path never touches guest memory and allocates nothing per fault: messages are
// decoded from a buffer shared with C, pages go from our mapping to the guest by UFFDIO_COPY.
import { toArrayBuffer, type Pointer } from "bun:ffi";
import {
  COPY_DONTWAKE,
  Errno,
  errnoName,
  NativeBuffer,
  sl,
  UFFD_EVENT_PAGEFAULT,
  UFFD_EVENT_REMOVE,
  UFFD_MSG_SIZE,
} from "./ffi.ts";
import { HandlerTable, PAGE_INSTALLED, PAGE_MISSING, PAGE_REMOVED, type Region } from "./handler-table.ts";
import { IMAGE_PAGE } from "./image/snapshot-image.ts";

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

  free(): void {
    this.msgs.free();
    this.done.free();
    this.zero2m.free();
    this.staging.free();
  }
}

export interface VmStats {
  faults: number;
  pagesInstalled: number;
  zeroPagesInstalled: number;
  bytesCopied: number;
  eexist: number;
  eagain: number;
  removes: number;
}

export interface VmOptions {
  /** Pages installed per fault: the aligned window of this many region pages around the fault. */
  faultAround: number;
}

const OK = 0;
const AGAIN = 1;
const GONE = 2;
const FAILED = 3;

export class VmSession {
  readonly stats: VmStats = { faults: 0, pagesInstalled: 0, zeroPagesInstalled: 0, bytesCopied: 0, eexist: 0, eagain: 0, removes: 0 };
  readonly connectedAt = performance.now();
  /** Fault addresses that met EAGAIN (a REMOVE was pending): retried after the next drain. */
  readonly retry: number[] = [];
  /** Set when the VM can no longer be served; the server closes it. */
  fatal: string | undefined;
  closed = false;
  private hitEexist = false;
  private lastErrno = 0;

  constructor(
    readonly id: number,
    readonly pid: number,
    readonly uffd: number,
    readonly sock: number,
    readonly table: HandlerTable,
    private readonly scratch: Scratch,
    private readonly options: VmOptions,
  ) {}

  /** Reads and serves every queued message. Returns false if the VM must be dropped. */
  drain(): boolean {
    const buf = this.scratch.msgs;
    const max = Scratch.MAX_MSGS;
    for (;;) {
      const n = sl.sl_uffd_read(this.uffd, buf.address, max);
      if (n < 0) {
        this.fatal = `reading the userfaultfd failed: ${errnoName(-n)}`;
        return false;
      }
      if (n > 0) this.dispatch(buf, n);
      if (this.fatal !== undefined) return false;
      if (this.retry.length && !this.serveRetries()) continue;
      if (n < max) return true;
    }
  }

  /** Retries faults that met EAGAIN; returns true when none is left. */
  serveRetries(): boolean {
    const pending = this.retry.splice(0, this.retry.length);
    for (const addr of pending) this.fault(addr);
    return this.retry.length === 0;
  }

  private dispatch(buf: NativeBuffer, n: number): void {
    const bytes = buf.bytes;
    const u32 = buf.u32;
    // REMOVEs first: a fault read in the same batch must not install data the guest already discarded.
    for (let i = 0; i < n; i++) {
      const o = i * UFFD_MSG_SIZE;
      if (bytes[o] === UFFD_EVENT_REMOVE) {
        const w = o >> 2;
        this.remove(u32[w + 2]! + u32[w + 3]! * 0x1_0000_0000, u32[w + 4]! + u32[w + 5]! * 0x1_0000_0000);
      }
    }
    for (let i = 0; i < n; i++) {
      const o = i * UFFD_MSG_SIZE;
      const event = bytes[o];
      if (event === UFFD_EVENT_PAGEFAULT) {
        const w = o >> 2;
        this.fault(u32[w + 4]! + u32[w + 5]! * 0x1_0000_0000);
        if (this.fatal !== undefined) return;
      } else if (event !== UFFD_EVENT_REMOVE) {
        // FORK/REMAP/UNMAP are never enabled by a Firecracker-style VMM; nothing to do for them.
      }
    }
  }

  /** Serves one fault: the run of pages around it first (waking the vCPU), then the rest of the window. */
  fault(addr: number): void {
    const region = this.table.find(addr);
    if (region === undefined) {
      this.fatal = `fault at 0x${addr.toString(16)} outside every region the VMM announced`;
      return;
    }
    this.stats.faults++;
    const ps = region.pageSize;
    const i = Math.floor((addr - region.base) / ps);
    const fa = this.options.faultAround;
    let w0 = i;
    let w1 = i + 1;
    if (fa > 1) {
      w0 = i - (i % fa);
      w1 = Math.min(w0 + fa, region.pages);
    }
    const state = region.state;
    const removed = state[i] === PAGE_REMOVED;
    const zero = removed || region.isZeroPage(i);
    // Grow the run over missing neighbours of the same kind, so one ioctl serves them all.
    let a = i;
    let b = i + 1;
    if (!removed && !region.isMixedPage(i)) {
      while (a > w0 && state[a - 1] === PAGE_MISSING && region.isZeroPage(a - 1) === zero && !region.isMixedPage(a - 1)) a--;
      while (b < w1 && state[b] === PAGE_MISSING && region.isZeroPage(b) === zero && !region.isMixedPage(b)) b++;
    }
    this.hitEexist = false;
    const r = this.installRun(region, a, b - a, zero, false);
    if (r === AGAIN) {
      this.stats.eagain++;
      this.retry.push(addr);
      return;
    }
    if (r === FAILED) {
      this.fatal = `installing page 0x${(region.base + i * ps).toString(16)} failed: ${errnoName(this.lastErrno)}`;
      return;
    }
    // The faulting page already existed (raced with another install): its waiter still sleeps.
    if (this.hitEexist) sl.sl_uffd_wake(this.uffd, region.base + i * ps, ps);
    if (fa > 1) {
      this.installMissing(region, w0, a);
      this.installMissing(region, b, w1);
    }
  }

  /** Installs every missing page in [from, to) of a region without waking anyone. */
  installMissing(region: Region, from: number, to: number): number {
    const state = region.state;
    let k = from;
    while (k < to) {
      if (state[k] !== PAGE_MISSING) {
        k++;
        continue;
      }
      const zero = region.isZeroPage(k);
      let e = k + 1;
      if (!region.isMixedPage(k)) {
        while (e < to && state[e] === PAGE_MISSING && region.isZeroPage(e) === zero && !region.isMixedPage(e)) e++;
      }
      const r = this.installRun(region, k, e - k, zero, true);
      if (r !== OK) return r;
      k = e;
    }
    return OK;
  }

  /**
   * Installs region pages [first, first+count), all of one kind (zero or data), in one ioctl when
   * possible. EEXIST skips the existing page and goes on; EAGAIN stops (retry after a drain).
   */
  installRun(region: Region, first: number, count: number, zero: boolean, dontWake: boolean): number {
    const ps = region.pageSize;
    const mode = dontWake ? COPY_DONTWAKE : 0;
    const doneBuf = this.scratch.done;
    let k = first;
    const end = first + count;
    while (k < end) {
      const dst = region.base + k * ps;
      let len = (end - k) * ps;
      let r: number;
      if (region.state[k] === PAGE_REMOVED || zero) {
        if (ps === IMAGE_PAGE) {
          r = sl.sl_uffd_zeropage(this.uffd, dst, len, mode, doneBuf.address);
        } else {
          len = ps; // hugetlbfs has no UFFDIO_ZEROPAGE: copy from our 2 MiB of zeros, one page at a time
          r = sl.sl_uffd_copy(this.uffd, dst, this.scratch.zero2m.address, len, mode, doneBuf.address);
        }
      } else if (ps !== IMAGE_PAGE && !region.backend.zeroBytesAreZero && region.isMixedPage(k)) {
        len = ps;
        r = sl.sl_uffd_copy(this.uffd, dst, this.assembleMixed(region, k), len, mode, doneBuf.address);
      } else {
        const src = region.backend.base + region.offset + k * ps;
        r = sl.sl_uffd_copy(this.uffd, dst, src, len, mode, doneBuf.address);
      }
      if (r === 0) {
        this.settle(region, k, len / ps, zero);
        k += len / ps;
        continue;
      }
      const donePages = Math.floor(doneBuf.u64(0) / ps);
      if (donePages > 0) this.settle(region, k, donePages, zero);
      k += donePages;
      const err = -r;
      // A partial copy reports EAGAIN with progress: go on from where it stopped.
      if (err === Errno.EAGAIN && donePages > 0) continue;
      if (err === Errno.EEXIST) {
        // Someone (a racing install, or the page was never gone) got there first.
        this.stats.eexist++;
        this.hitEexist = true;
        if (region.state[k] === PAGE_MISSING) region.setState(k, PAGE_INSTALLED);
        k++;
        continue;
      }
      if (err === Errno.EAGAIN) return AGAIN;
      // ENOENT: the range is no longer registered (unmapped); ESRCH: the process is exiting.
      if (err === Errno.ENOENT || err === Errno.ESRCH) return GONE;
      this.lastErrno = err;
      return FAILED;
    }
    return OK;
  }

  private settle(region: Region, first: number, count: number, zero: boolean): void {
    for (let k = first; k < first + count; k++) {
      if (region.state[k] === PAGE_MISSING) region.setState(k, PAGE_INSTALLED);
    }
    this.stats.pagesInstalled += count;
    if (zero) this.stats.zeroPagesInstalled += count;
    else this.stats.bytesCopied += count * region.pageSize;
  }

  /** Builds a 2 MiB page whose zero 4 KiB pages must not come from the file (mapped-ram). */
  private assembleMixed(region: Region, k: number): number {
    const st = this.scratch.staging;
    const firstImage = (region.offset + k * region.pageSize) / IMAGE_PAGE;
    const src = new Uint8Array(toArrayBuffer((region.backend.base + region.offset + k * region.pageSize) as Pointer, 0, region.pageSize));
    for (let p = 0; p < region.imagePagesPerPage; p++) {
      const off = p * IMAGE_PAGE;
      if (region.backend.zero.isZero(firstImage + p)) st.bytes.fill(0, off, off + IMAGE_PAGE);
      else st.bytes.set(src.subarray(off, off + IMAGE_PAGE), off);
    }
    return st.address;
  }

  /** UFFD_EVENT_REMOVE: [start, end) reads as zeros from now on. */
  private remove(start: number, end: number): void {
    this.stats.removes++;
    for (const region of this.table.regions) {
      const s = Math.max(start, region.base);
      const e = Math.min(end, region.end);
      if (s >= e) continue;
      const first = Math.floor((s - region.base) / region.pageSize);
      const last = Math.ceil((e - region.base) / region.pageSize);
      for (let k = first; k < last; k++) region.setState(k, PAGE_REMOVED);
    }
  }
}
