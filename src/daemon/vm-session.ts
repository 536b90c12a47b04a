// One connected VM's fault path: its uffd, its handler table, and the installs.
// The fault path never touches guest memory and allocates nothing per fault: messages are
// decoded from a buffer shared with C, pages go from our mapping (or a receive buffer) to the
// guest by UFFDIO_COPY. What the VM's life does with the result (retry, detach, fail, close) is
// decided by its owner, the VmSupervisor; this module only reports a failure, once.
import type { ErrorCode } from "../core/errors.ts";
import type { Fields } from "../core/log.ts";
import { Errno, errnoName, type NativeBuffer } from "../core/ffi.ts";
import type { HandlerTable, Region } from "../scheduler/handler-table.ts";
import { HOW_BACKGROUND, HOW_FAULT, HOW_FAULT_AROUND, KIND_DATA, KIND_NAMES, PageInstaller, Scratch, type VmStats } from "../sinks/uffd/page-installer.ts";
import { realKernel, type UffdKernel } from "../sinks/uffd/kernel.ts";
import { newHistogram, observe } from "../metrics/histogram.ts";
import { IMAGE_PAGE } from "../sources/image/snapshot-image.ts";
import { AGAIN, EXISTED, type InstallOutcome, INSTALLED, installErrno, installFailed, PAGE_IN_FLIGHT, PAGE_INSTALLED, PAGE_MISSING, PAGE_REMOVED, type PageRequester, type RequesterVm } from "../sources/port.ts";
import { decodeMessages } from "../sinks/uffd/uffd-messages.ts";
import type { TouchRecorder } from "../scheduler/working-set.ts";
import type { PopulatorVm } from "../scheduler/populator-vm.ts";
import { windowEnd, windowStart } from "../scheduler/fault-window.ts";

const ignoreRemove = () => {};

export { Scratch, type VmStats } from "../sinks/uffd/page-installer.ts";

/** Why a VM cannot be served any more: reported once (the first cause wins), acted on by its owner. */
export interface VmFailure {
  readonly kind: "failed";
  readonly code: ErrorCode;
  /** One line for the log ("installing page 0x... failed: EFAULT"). */
  readonly detail: string;
  /** The kernel's answer, when a system call failed. */
  readonly errno?: number;
  /** The error's facts (a store's chunk, key, ...), logged as vm.failed's fields. */
  readonly context?: Fields;
}

export interface VmOptions {
  /** 4 KiB pages installed per fault: the aligned window around it (at least the faulting page). */
  faultAround: number;
  /** Records first touches (image pages) when set. */
  recorder?: TouchRecorder;
  /** The userfaultfd calls (default: the C core); tests pass a model of the kernel. */
  kernel?: UffdKernel;
}

/** Bytes per background install: large enough to amortise the ioctl, small enough that a fault never waits long. */
const BACKGROUND_RUN_BYTES = 2 * 1024 * 1024;
/** uffd reads per drain() (up to 64 messages each) before other VMs get their turn. */
export const MAX_DRAIN_ROUNDS = 16;
/** After this long, a drain reads no more (the loop looks at the other fds first). */
export const DRAIN_SLICE_NS = 200_000;

export class VmSession implements RequesterVm, PopulatorVm {
  readonly stats: VmStats = {
    faults: 0,
    pagesInstalled: 0,
    zeroPagesInstalled: 0,
    prefetchedPages: 0,
    populatedPages: 0,
    bytesCopied: 0,
    eexist: 0,
    eagain: 0,
    removes: 0,
    prefetchLate: 0,
  };
  /** Fault service latency (µs, from reading the fault to its page in place), power-of-two buckets. */
  readonly latency = newHistogram();
  /** Bun.nanoseconds() when the batch being served was read (half the cost of performance.now()). */
  private batchStart = 0;
  /** Remote backend: faulting page address -> when its fault was read (Bun.nanoseconds()), until its bytes arrive. */
  private readonly remoteWaits = new Map<number, number>();
  /** Fault addresses that met EAGAIN (a REMOVE was pending): retried after the next drain. */
  readonly retry: number[] = [];
  private failed: VmFailure | undefined;
  /** Where the guest last faulted (the populator follows it). */
  lastFaultRegion: Region | undefined;
  lastFaultPage = 0;
  /** Puts pages into this VM's memory. */
  readonly installer: PageInstaller;
  private readonly onRemove = (start: number, end: number) => this.remove(start, end);
  /** Asks for pages of a remote backend; undefined for local images. */
  private requester: PageRequester | undefined;
  private readonly kernel: UffdKernel;

  constructor(
    readonly id: number,
    readonly uffd: number,
    readonly table: HandlerTable,
    private readonly scratch: Scratch,
    private readonly options: VmOptions,
  ) {
    this.kernel = options.kernel ?? realKernel;
    this.installer = new PageInstaller(uffd, scratch, this.stats, this.kernel);
  }

  /** Set once the VM can no longer be served (the first cause); undefined while it can. */
  get failure(): VmFailure | undefined {
    return this.failed;
  }

  /** Records why the VM cannot be served; a later cause does not replace the first. */
  fail(code: ErrorCode, detail: string, errno?: number, context?: Fields): void {
    if (this.failed !== undefined) return;
    this.failed = { kind: "failed", code, detail, ...(errno !== undefined ? { errno } : {}), ...(context !== undefined ? { context } : {}) };
  }

  /** Wakes vCPUs blocked on region pages [lo, hi) (pages installed without a wake). */
  wake(region: Region, lo: number, hi: number): void {
    this.kernel.wake(this.uffd, region.base + lo * region.pageSize, (hi - lo) * region.pageSize);
  }

  setRequester(r: PageRequester): void {
    this.requester = r;
  }

  /** Pages come from a page server (postcopy), not a local image. */
  get remote(): boolean {
    return this.requester !== undefined;
  }

  /**
   * Reads and serves the queued messages, at most `rounds` reads of up to `msgs` messages, and no
   * further read once DRAIN_SLICE_NS have passed: the rest stays queued (epoll reports the uffd
   * again) so one busy VM cannot hold the loop. Returns false if the VM must be dropped. Faults
   * left in `retry` are for the caller to retry later.
   */
  drain(msgs: number = Scratch.MAX_MSGS, rounds: number = MAX_DRAIN_ROUNDS): boolean {
    const buf = this.scratch.msgs;
    const max = Math.min(msgs, Scratch.MAX_MSGS);
    let start = 0;
    for (let round = 1; ; round++) {
      const n = this.kernel.read(this.uffd, buf.address, max);
      if (n < 0) {
        this.fail("SYSCALL", `reading the userfaultfd failed: ${errnoName(-n)}`, -n);
        return false;
      }
      if (n > 0) this.dispatch(buf, n);
      if (this.failed !== undefined) return false;
      if (round >= rounds) return true;
      if (this.retry.length && !this.serveRetries()) {
        // Still EAGAIN. Reading again helps only if the pending event was not read yet; with the
        // queue empty the kernel is waiting for the VMM's thread to finish its madvise (it may be
        // throttled for long): re-reading an empty uffd would spin and starve every other VM.
        if (n === 0) return true;
      } else if (n < max) return true;
      // More may be queued. The clock is read only here (a drain of one fault never gets here):
      // the first round's batch was read at batchStart (dispatch or serveRetries just set it).
      if (round === 1) start = this.batchStart;
      else if (Bun.nanoseconds() - start >= DRAIN_SLICE_NS) return true;
    }
  }

  /** Retries faults that met EAGAIN; returns true when none is left. */
  serveRetries(): boolean {
    const pending = this.retry.splice(0, this.retry.length);
    // Their latency counts from the retry: the first attempt's read time is not kept.
    this.batchStart = Bun.nanoseconds();
    for (const addr of pending) this.fault(addr, 1, 1);
    return this.retry.length === 0;
  }

  /** Serves n messages already in buf (what drain read; the JIT warm-up feeds it too). */
  dispatch(buf: NativeBuffer, n: number): void {
    const faults = this.scratch.faults;
    this.batchStart = Bun.nanoseconds();
    // REMOVEs are applied while decoding, before any fault of the batch is served: a fault read
    // with them must not install data the guest already discarded.
    const nf = decodeMessages(buf, n, faults, this.onRemove);
    // Faults on neighbouring pages (several vCPUs walking memory) become one run, one ioctl.
    let i = 0;
    while (i < nf) {
      const addr = faults[i]!;
      let j = i + 1;
      const region = this.table.find(addr);
      let span = 1;
      if (region !== undefined) {
        const ps = region.pageSize;
        const first = Math.floor((addr - region.base) / ps);
        let last = first;
        while (j < nf && faults[j]! < region.end && Math.floor((faults[j]! - region.base) / ps) <= last + 1) {
          last = Math.floor((faults[j]! - region.base) / ps);
          j++;
        }
        span = last - first + 1;
      }
      this.fault(addr, span, j - i);
      if (this.failed !== undefined) return;
      // Faults beyond the first of a coalesced group: counted, and woken by the run's wake.
      this.stats.faults += j - i - 1;
      i = j;
    }
  }

  /**
   * Serves a fault (or `span` neighbouring faults starting at addr): the run of pages around it
   * first, waking the vCPU, then the rest of the fault-around window without waking. `waiters`
   * vCPUs wait on it (coalesced faults), for the latency histogram.
   */
  fault(addr: number, span: number, waiters = 1): void {
    const region = this.table.find(addr);
    if (region === undefined) {
      this.fail("UNANNOUNCED_MEMORY", `fault at 0x${addr.toString(16)} outside every region the VMM announced`);
      return;
    }
    this.stats.faults++;
    const ps = region.pageSize;
    const i = Math.floor((addr - region.base) / ps);
    const iEnd = Math.min(i + span, region.pages);
    this.lastFaultRegion = region;
    this.lastFaultPage = iEnd;
    const state = region.state;
    const recorder = this.options.recorder;
    if (recorder !== undefined) {
      for (let k = i; k < iEnd; k++) if (state[k] === PAGE_MISSING || state[k] === PAGE_IN_FLIGHT) recorder.add(region.firstImagePage + k * region.imagePagesPerPage);
    }
    // Fault-around counts 4 KiB pages: on 2 MiB pages the same bytes are one page, not 16 x 2 MiB.
    const fa = Math.max(1, Math.floor((this.options.faultAround * IMAGE_PAGE) / ps));
    const w0 = windowStart(i, fa);
    const w1 = windowEnd(w0, iEnd, fa, region.pages);
    const installer = this.installer;
    installer.faultLo = i;
    installer.faultHi = iEnd;
    if (this.requester !== undefined) return this.faultRemote(region, i, iEnd, w0, w1);

    // The rest of the window goes in first, unwoken: a vCPU walking memory must not fault on
    // the next page while we are still installing it.
    if (fa > 1) {
      this.installMissing(region, w0, i, 0, HOW_FAULT_AROUND);
      this.installMissing(region, iEnd, w1, 0, HOW_FAULT_AROUND);
    }
    // Every page of the fault span is installed (or re-tried: EEXIST then wakes it).
    let r: InstallOutcome = INSTALLED;
    let existed = false;
    let k = i;
    installer.how = HOW_FAULT;
    while (k < iEnd) {
      const removed = state[k] === PAGE_REMOVED;
      const zero = removed || region.isZeroPage(k);
      let a = k;
      let b = k + 1;
      if (!removed && !region.isMixedPage(k)) {
        // Grow the run over neighbours of the same kind, so one ioctl serves them all.
        if (k === i) while (a > w0 && state[a - 1] === PAGE_MISSING && this.sameKind(region, a - 1, zero)) a--;
        while (b < w1 && (b < iEnd ? state[b] !== PAGE_REMOVED : state[b] === PAGE_MISSING) && this.sameKind(region, b, zero)) b++;
      }
      r = this.installer.installRun(region, a, b - a, zero, false);
      if (r === EXISTED) existed = true;
      else if (r !== INSTALLED) break;
      k = b;
    }
    if (r === AGAIN) {
      this.stats.eagain++;
      // Every faulting page from k on has a vCPU asleep on it (coalesced faults), not only page k.
      for (let p = k; p < iEnd; p++) this.retry.push(region.base + p * ps);
      // Pages before k that already existed (EEXIST) still need their wake.
      if (existed && k > i) this.wake(region, i, k);
      return;
    }
    if (installFailed(r)) return this.failInstall(region, k, r);
    // GONE: the range went away (the VMM unmapped it or is exiting); nobody is left to wake.
    // A faulting page already existed (raced with another install): its waiter still sleeps.
    if (existed) this.wake(region, i, iEnd);
    observe(this.latency, (Bun.nanoseconds() - this.batchStart) / 1000, waiters);
  }

  private failInstall(region: Region, k: number, r: InstallOutcome): void {
    const errno = installErrno(r);
    this.fail("SYSCALL", `installing page 0x${(region.base + k * region.pageSize).toString(16)} failed: ${errnoName(errno)}`, errno);
  }

  private sameKind(region: Region, k: number, zero: boolean): boolean {
    return region.isZeroPage(k) === zero && !region.isMixedPage(k);
  }

  /** Remote backend: zero pages are installed here and now; data pages are requested. */
  private faultRemote(region: Region, i: number, iEnd: number, w0: number, w1: number): void {
    const requester = this.requester!;
    const state = region.state;
    const ps = region.pageSize;
    this.installer.how = HOW_FAULT;
    let servedNow = 0;
    for (let k = i; k < iEnd; k++) {
      const s = state[k];
      if (s === PAGE_IN_FLIGHT || (s === PAGE_MISSING && !region.isZeroPage(k))) {
        // Served when its bytes arrive (deliver); the first fault's read time is kept.
        const addr = region.base + k * ps;
        if (!this.remoteWaits.has(addr)) this.remoteWaits.set(addr, this.batchStart);
      } else servedNow++;
      if (s === PAGE_IN_FLIGHT) requester.hurry(region, k);
      // Installed meanwhile (background zero pages go in unwoken): only the wake is missing.
      // Checked before "zero" so an installed zero page is not installed again (EEXIST, no wake).
      else if (s === PAGE_INSTALLED) this.wake(region, k, k + 1);
      else if (s === PAGE_REMOVED || region.isZeroPage(k)) {
        const r = this.installer.installRun(region, k, 1, true, false);
        if (r === AGAIN) {
          this.stats.eagain++;
          this.retry.push(region.base + k * ps);
        } else if (installFailed(r)) {
          return this.failInstall(region, k, r);
        } else if (r === EXISTED) {
          this.wake(region, k, k + 1); // a removed page answered before: its waiter still sleeps
        }
      } else this.requestRun(region, k, Math.max(w1, k + 1), true);
    }
    if (servedNow > 0) observe(this.latency, (Bun.nanoseconds() - this.batchStart) / 1000, servedNow);
    if (w1 > w0) {
      this.installMissing(region, w0, i, 0, HOW_FAULT_AROUND);
      this.installMissing(region, iEnd, w1, 0, HOW_FAULT_AROUND);
    }
  }

  /** Marks and requests the missing data pages from k up to `limit` (stopping at the first other page). */
  private requestRun(region: Region, k: number, limit: number, urgent: boolean): number {
    let e = k;
    while (e < limit && region.state[e] === PAGE_MISSING && !region.isZeroPage(e)) {
      region.setState(e, PAGE_IN_FLIGHT);
      e++;
    }
    if (e > k) this.requester!.request(region, k, e - k, urgent);
    return e;
  }

  /**
   * Installs (or, for a remote backend, requests) every missing page in [from, to) of a region
   * without waking anyone. Stops after `budget` pages when budget > 0. Returns INSTALLED (nobody
   * to wake: pages that existed already are the fault path's to wake), AGAIN, GONE or -errno.
   * `how` (HOW_*) is what the installs count as in the metrics.
   */
  installMissing(region: Region, from: number, to: number, budget: number, how: number = HOW_BACKGROUND): InstallOutcome {
    const state = region.state;
    this.installer.how = how;
    const remote = this.requester !== undefined;
    const maxRun = Math.max(1, Math.floor(BACKGROUND_RUN_BYTES / region.pageSize));
    let k = from;
    let used = 0;
    while (k < to) {
      if (state[k] !== PAGE_MISSING) {
        k++;
        continue;
      }
      if (budget > 0 && used >= budget) break;
      const zero = region.isZeroPage(k);
      const limit = Math.min(to, k + maxRun);
      if (remote && !zero) {
        const e = this.requestRun(region, k, limit, false);
        used += e - k;
        k = e;
        continue;
      }
      let e = k + 1;
      if (!region.isMixedPage(k)) while (e < limit && state[e] === PAGE_MISSING && this.sameKind(region, e, zero)) e++;
      const r = this.installer.installRun(region, k, e - k, zero, true);
      if (r !== INSTALLED && r !== EXISTED) return r;
      used += e - k;
      k = e;
    }
    return INSTALLED;
  }

  /** Bytes for region pages [first, first+count) arrived at src (a remote backend's buffer). */
  deliver(region: Region, first: number, count: number, src: number): InstallOutcome {
    const ps = region.pageSize;
    const state = region.state;
    let k = first;
    while (k < first + count) {
      if (state[k] !== PAGE_IN_FLIGHT) {
        k++; // removed or installed meanwhile: these bytes are stale for it
        continue;
      }
      let e = k + 1;
      while (e < first + count && state[e] === PAGE_IN_FLIGHT) e++;
      for (let p = k; p < e; p++) region.setState(p, PAGE_MISSING);
      // Always wake: a vCPU may be waiting on any of these pages.
      this.installer.how = HOW_BACKGROUND;
      const before = this.stats.pagesInstalled;
      const r = this.installer.installFrom(region, k, e - k, src + (k - first) * ps, false);
      if (this.remoteWaits.size > 0 && this.stats.pagesInstalled > before) this.servedWaits(region, k, k + this.stats.pagesInstalled - before);
      if (r === AGAIN) {
        // A REMOVE is pending: serve these again (as faults) once it has been read, rather than guess.
        for (let p = k; p < e; p++) if (state[p] === PAGE_MISSING) this.retry.push(region.base + p * ps);
        return AGAIN;
      }
      // Someone installed some of them first: the copy woke nobody for those; a vCPU may wait there.
      if (r === EXISTED) this.wake(region, k, e);
      else if (r !== INSTALLED) return r;
      k = e;
    }
    return INSTALLED;
  }

  /** Pages [k, e) arrived for faults that waited on them: their latency, and they count as fault pages. */
  private servedWaits(region: Region, k: number, e: number): void {
    const now = Bun.nanoseconds();
    const pages = this.installer.pages;
    for (let p = k; p < e; p++) {
      const addr = region.base + p * region.pageSize;
      const t0 = this.remoteWaits.get(addr);
      if (t0 === undefined) continue;
      this.remoteWaits.delete(addr);
      observe(this.latency, (now - t0) / 1000);
      pages[HOW_BACKGROUND * KIND_NAMES.length + KIND_DATA]!--;
      pages[HOW_FAULT * KIND_NAMES.length + KIND_DATA]!++;
    }
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

  /**
   * After detach: reads whatever is queued so no event waits on us. REMOVEs need no answer now;
   * faults inside our regions are woken (to retry as plain faults); a fault outside every
   * announced region means the VMM registered memory it never told us about: fatal.
   */
  discardMessages(): void {
    const buf = this.scratch.msgs;
    const faults = this.scratch.faults;
    for (;;) {
      const n = this.kernel.read(this.uffd, buf.address, Scratch.MAX_MSGS);
      if (n <= 0) return;
      const nf = decodeMessages(buf, n, faults, ignoreRemove);
      for (let i = 0; i < nf; i++) {
        const addr = faults[i]!;
        const region = this.table.find(addr);
        if (region === undefined) {
          this.fail("UNANNOUNCED_MEMORY", `fault at 0x${addr.toString(16)} outside every region the VMM announced`);
          continue;
        }
        // A fault that raced the unregister can miss its wake-up (seen on hugetlbfs and 4 KiB
        // pages: the vCPU slept forever). Wake it: the range is no longer ours, so its retry is
        // a plain fault.
        const page = region.base + Math.floor((addr - region.base) / region.pageSize) * region.pageSize;
        this.kernel.wake(this.uffd, page, region.pageSize);
      }
      // The whole batch was looked at (every FORK fd closed) before giving up on the VM.
      if (this.failed !== undefined) return;
    }
  }

  /** Unregisters every region: the VM no longer depends on us. Only when every page is settled. */
  detach(): boolean {
    if (!this.table.complete) return false;
    for (const r of this.table.regions) {
      const rc = this.kernel.unregister(this.uffd, r.base, r.size);
      if (rc < 0 && -rc !== Errno.ENOENT && -rc !== Errno.EINVAL) {
        this.fail("SYSCALL", `unregistering region ${r.index} failed: ${errnoName(-rc)}`, -rc);
        return false;
      }
    }
    return true;
  }
}
