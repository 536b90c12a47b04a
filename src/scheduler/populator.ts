// Installs pages nobody has faulted on yet, while faults keep priority: first the recorded
// working set (prefetch, in recorded order), then — with `--populate background` — every page
// left, until the VM no longer needs us. Runs only when the event loop has no fd ready.
import { PAGE_MISSING, PAGE_REMOVED, type Region } from "./handler-table.ts";
import { HOW_PREFETCH } from "../sinks/uffd/page-installer.ts";
import { AGAIN, GONE, INSTALLED, installFailed } from "../sources/port.ts";
import type { VmSession } from "../daemon/vm-session.ts";

export type PopulateMode = "none" | "background";

/**
 * Recorded pages per prefetch step. A step sorts its pages so neighbours in the image become one
 * ioctl (a guest touching a cluster in random order records it shuffled), while the recorded
 * order still holds from one step to the next.
 */
const PREFETCH_STEP_PAGES = 128;
/** Bytes per background step. */
const SWEEP_STEP_BYTES = 2 * 1024 * 1024;

export class Populator {
  private prefetchPos = 0;
  private sweepRegion = 0;
  private sweepPage = 0;
  private seenFaults = 0;
  private settledAtPassStart = -1;
  private done = false;
  /** performance.now() when the last page was settled by us, for the log. */
  finishedAt = 0;

  constructor(
    private readonly vm: VmSession,
    private readonly prefetch: Uint32Array | undefined,
    private readonly mode: PopulateMode,
  ) {
    if (!prefetch?.length && mode === "none") this.done = true;
  }

  get idle(): boolean {
    return this.done;
  }

  /** One slice of work. Returns true while more remains. */
  step(): boolean {
    // Its owner stops calling once the VM is detached or closed.
    if (this.done) return false;
    const order = this.prefetch;
    if (order !== undefined && this.prefetchPos < order.length) {
      this.prefetchStep(order);
      return true;
    }
    if (this.mode === "background" && this.sweepStep()) return true;
    this.done = true;
    this.finishedAt = performance.now();
    return false;
  }

  private readonly batch = new Uint32Array(PREFETCH_STEP_PAGES);

  private prefetchStep(recorded: Uint32Array): void {
    const regions = this.vm.table.regions;
    const take = Math.min(PREFETCH_STEP_PAGES, recorded.length - this.prefetchPos);
    const order = this.batch.subarray(0, take);
    order.set(recorded.subarray(this.prefetchPos, this.prefetchPos + take));
    order.sort();
    const end = take;
    // Per region, the span installed in this step, woken once at the end.
    let woke: Region | undefined;
    let lo = 0;
    let hi = 0;
    let i = 0;
    while (i < end) {
      const p = order[i]!;
      let region: Region | undefined;
      let k = -1;
      for (const r of regions) {
        k = r.pageOfImagePage(p);
        if (k >= 0) {
          region = r;
          break;
        }
      }
      i++;
      if (region === undefined) continue;
      if (region.state[k] !== PAGE_MISSING) {
        // The guest got there first (or discarded it): the prefetch came too late for this page.
        if (region.state[k] !== PAGE_REMOVED) this.vm.stats.prefetchLate++;
        continue;
      }
      // Coalesce recorded pages that follow each other in the image into one run.
      let e = k + 1;
      while (i < end && e < region.pages && region.pageOfImagePage(order[i]!) === e) {
        e++;
        i++;
      }
      const r = this.vm.installMissing(region, k, e, 0, HOW_PREFETCH);
      if (r === AGAIN) {
        // A REMOVE is pending: this batch again next step (pages already in are skipped then).
        if (woke !== undefined) this.wake(woke, lo, hi);
        return;
      }
      if (installFailed(r) || r === GONE) continue;
      this.vm.stats.prefetchedPages += e - k;
      if (woke !== region) {
        if (woke !== undefined) this.wake(woke, lo, hi);
        woke = region;
        lo = k;
        hi = e;
      } else {
        lo = Math.min(lo, k);
        hi = Math.max(hi, e);
      }
    }
    if (woke !== undefined) this.wake(woke, lo, hi);
    this.prefetchPos += take;
  }

  private wake(region: Region, lo: number, hi: number): void {
    // A vCPU that faulted on one of these pages while we installed it is released here.
    this.vm.wake(region, lo, hi);
  }

  /**
   * Returns true while pages remain to sweep. The sweep follows the guest: after a fault it
   * continues from the faulting page, so a guest walking memory finds the pages ahead of it
   * installed; pages it jumped over are picked up by a later pass.
   */
  private sweepStep(): boolean {
    const vm = this.vm;
    const regions = vm.table.regions;
    if (vm.lastFaultRegion !== undefined && vm.stats.faults !== this.seenFaults) {
      this.seenFaults = vm.stats.faults;
      this.sweepRegion = regions.indexOf(vm.lastFaultRegion);
      this.sweepPage = vm.lastFaultPage;
    }
    for (;;) {
      if (this.sweepRegion >= regions.length) {
        // End of a pass: another one while the previous pass still made progress.
        if (vm.table.complete || this.settledAtPassStart === vm.table.settledPages) return false;
        this.settledAtPassStart = vm.table.settledPages;
        this.sweepRegion = 0;
        this.sweepPage = 0;
      }
      const region = regions[this.sweepRegion]!;
      if (this.sweepPage >= region.pages || region.settled === region.pages) {
        this.sweepRegion++;
        this.sweepPage = 0;
        continue;
      }
      const span = Math.max(1, Math.floor(SWEEP_STEP_BYTES / region.pageSize));
      const to = Math.min(region.pages, this.sweepPage + span);
      const before = region.settled;
      const r = vm.installMissing(region, this.sweepPage, to, 0);
      if (r === INSTALLED) {
        vm.stats.populatedPages += region.settled - before;
        this.sweepPage = to;
      } else if (r === GONE || installFailed(r)) {
        // The range went away (unmapped) or cannot be installed: faults still get served.
        this.sweepRegion++;
        this.sweepPage = 0;
      }
      // AGAIN: a REMOVE is pending; the loop reads it before our next step.
      return true;
    }
  }
}