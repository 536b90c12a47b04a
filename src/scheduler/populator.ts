// Installs pages nobody has faulted on yet, while faults keep priority: first the recorded
// working set (prefetch, in recorded order), then — with `--populate background` — every page
// left, until the VM no longer needs us. Runs only when the event loop has no fd ready.
import { PAGE_MISSING, PAGE_REMOVED, type Region } from "./handler-table.ts";
import { HOW_PREFETCH } from "../sinks/uffd/page-installer.ts";
import { AGAIN, GONE, installFailed } from "../sources/port.ts";
import type { VmSession } from "../daemon/vm-session.ts";
import { PrefetchOrder } from "./prefetch-order.ts";
import { SweepOrder } from "./sweep-order.ts";

export type PopulateMode = "none" | "background";

/** Bytes per background step. */
const SWEEP_STEP_BYTES = 2 * 1024 * 1024;

export class Populator {
  private readonly prefetchOrder: PrefetchOrder | undefined;
  private readonly sweep: SweepOrder;
  private readonly regionDone: (u: number) => boolean;
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
    if (prefetch?.length) this.prefetchOrder = new PrefetchOrder(prefetch);
    const regions = vm.table.regions;
    this.sweep = new SweepOrder(regions.length, (u) => regions[u]!.pages, (u) => Math.floor(SWEEP_STEP_BYTES / regions[u]!.pageSize));
    this.regionDone = (u) => regions[u]!.settled === regions[u]!.pages;
  }

  get idle(): boolean {
    return this.done;
  }

  /** One slice of work. Returns true while more remains. */
  step(): boolean {
    // Its owner stops calling once the VM is detached or closed.
    if (this.done) return false;
    const order = this.prefetchOrder;
    if (order !== undefined && !order.done) {
      this.prefetchStep(order);
      return true;
    }
    if (this.mode === "background" && this.sweepStep()) return true;
    this.done = true;
    this.finishedAt = performance.now();
    return false;
  }

  private prefetchStep(prefetch: PrefetchOrder): void {
    const regions = this.vm.table.regions;
    const order = prefetch.step();
    const end = order.length;
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
        prefetch.retry(end);
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
    const sweep = this.sweep;
    if (vm.lastFaultRegion !== undefined && vm.stats.faults !== this.seenFaults) {
      this.seenFaults = vm.stats.faults;
      sweep.follow(regions.indexOf(vm.lastFaultRegion), vm.lastFaultPage);
    }
    for (;;) {
      if (vm.table.complete) return false;
      if (!sweep.next(this.regionDone)) {
        // End of a pass: another one while the previous pass still made progress.
        if (this.settledAtPassStart === vm.table.settledPages) return false;
        this.settledAtPassStart = vm.table.settledPages;
        continue;
      }
      const region = regions[sweep.unit]!;
      const before = region.settled;
      const r = vm.installMissing(region, sweep.from, sweep.to, 0);
      // AGAIN: a REMOVE is pending; the loop reads it before our next step, then this span again.
      if (r === AGAIN) sweep.again();
      // The range went away (unmapped) or cannot be installed: faults still get served.
      else if (r === GONE || installFailed(r)) sweep.skipUnit();
      else vm.stats.populatedPages += region.settled - before;
      return true;
    }
  }
}
