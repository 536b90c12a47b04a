// The postcopy client's background completion: requests every page the VM has not touched, in
// the sweep order the populator and the QEMU sink share (src/scheduler/sweep-order.ts), one
// slot's worth of region pages per span, while the background window has room. Zero pages are
// installed on the spot (by `installMissing`); data pages go on the sweep's queue, sent after
// fault-around and prefetch requests. One pass is not always enough: pages that met a pending
// REMOVE went back to missing, so when a pass is over and nothing is in flight, another starts,
// as long as the last one asked for something.
import type { EventLoop } from "../core/event-loop.ts";
import { SweepOrder } from "../scheduler/sweep-order.ts";
import { AGAIN, GONE, installFailed, type PageRegion, type RequesterVm } from "../sources/port.ts";

/** Region pages the sweep looks at per turn, so a mostly-installed VM does not stall faults. */
const SWEEP_PAGES_PER_TURN = 16_384;

/** What the sweep needs of the client it feeds. */
export interface SweepClient {
  /** True while the background window (in flight plus the sweep's queue) has no room. */
  windowFull(): boolean;
  /** Requests on the sweep's queue. */
  queued(): number;
  /** Sends what the turn queued. */
  send(): void;
  /** Nothing queued, in flight, or waiting for a redelivery. */
  idle(): boolean;
  /** Pages were installed (zero pages alone may have completed the VM). */
  delivered(): void;
}

export class BackgroundSweep {
  /** True during a turn: requests made meanwhile (by `installMissing`) are the sweep's. */
  sweeping = false;
  private scheduled = false;
  private stopped = false;
  private readonly order: SweepOrder;
  private readonly regionDone: (unit: number) => boolean;
  /** The order finished a pass; the next starts only through `restart`. */
  private passOver: boolean;
  private requestedThisPass = 0;

  constructor(
    private readonly vm: RequesterVm,
    private readonly loop: EventLoop,
    private readonly enabled: boolean,
    /** Region pages per span (the order takes at least one). */
    spanPages: (region: PageRegion) => number,
    private readonly client: SweepClient,
  ) {
    const regions = vm.table.regions;
    this.order = new SweepOrder(regions.length, (u) => regions[u]!.pages, (u) => spanPages(regions[u]!));
    this.regionDone = (u) => regions[u]!.settled === regions[u]!.pages;
    this.passOver = regions.length === 0;
  }

  schedule(): void {
    if (!this.enabled || this.scheduled || this.stopped || this.passOver) return;
    this.scheduled = true;
    this.loop.after(0, () => {
      this.scheduled = false;
      this.turn();
    });
  }

  /** The VM is detached or gone. */
  stop(): void {
    this.stopped = true;
  }

  /** Requests the next missing pages, in sweep order, while the background window has room. */
  private turn(): void {
    if (this.stopped) return;
    const regions = this.vm.table.regions;
    const order = this.order;
    let looked = 0;
    this.sweeping = true;
    try {
      for (;;) {
        if (this.client.windowFull()) break;
        if (looked >= SWEEP_PAGES_PER_TURN) {
          this.sweeping = false;
          this.schedule();
          break;
        }
        if (!order.next(this.regionDone)) {
          this.passOver = true;
          break;
        }
        const region = regions[order.unit]!;
        const before = region.settled;
        const queued = this.client.queued();
        const r = this.vm.installMissing(region, order.from, order.to, 0);
        this.vm.stats.populatedPages += region.settled - before; // zero pages, installed right here
        this.requestedThisPass += this.client.queued() - queued;
        if (r === AGAIN) {
          // A REMOVE is pending; the VM's owner reads it before our next turn, then this span again.
          order.again();
          this.loop.after(1, () => this.schedule());
          break;
        }
        if (r === GONE || installFailed(r)) {
          order.skipUnit();
          continue;
        }
        looked += order.to - order.from;
      }
    } finally {
      this.sweeping = false;
    }
    this.client.send();
    // Zero pages alone may have completed the VM.
    if (this.vm.table.complete) this.client.delivered();
    if (!this.stopped) this.restart();
  }

  /** After a pass, with nothing in flight: another pass, if the last one asked for something. */
  restart(): void {
    if (!this.passOver || this.vm.table.complete) return;
    if (!this.client.idle()) return;
    if (this.requestedThisPass === 0) return;
    this.requestedThisPass = 0;
    this.passOver = false;
    this.schedule();
  }
}
