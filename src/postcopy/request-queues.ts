// The postcopy client's requests waiting to be sent, by priority: urgent (a vCPU waits: sent at
// once, on the urgent connection), then background (fault-around neighbours and prefetch), then
// the sweep's (background completion), the last two within the background window. Requests are
// cut to one slot's bytes; queued background runs split only by zero pages become one request,
// since the page server skips zero pages anyway.
import type { NativeBuffer } from "../core/ffi.ts";
import type { ZeroMap } from "../sources/image/snapshot-image.ts";
import type { PageRegion } from "../sources/port.ts";

/** One request to the page server: region pages [first, first+count), one slot's bytes at most. */
export interface PageRequest {
  id: number;
  region: PageRegion;
  first: number;
  count: number;
  /** Image byte range [start, start+bytes). */
  start: number;
  bytes: number;
  urgent: boolean;
  sweep: boolean;
  slot: NativeBuffer | undefined;
  /** Next byte (within the request) a DATA frame may start at: chunks come in order. */
  cursor: number;
  sent: boolean;
}

export class RequestQueues {
  readonly urgent: PageRequest[] = [];
  readonly background: PageRequest[] = [];
  readonly sweep: PageRequest[] = [];
  /** Bytes of the sweep's queued requests (they count against the background window). */
  sweepBytes = 0;
  /** Every id handed out is below this one. */
  nextId = 1;
  /** Per region (by index): 1 where an urgent request covers the page (no second hurry). */
  private readonly urgentPages: Uint8Array[] = [];

  constructor(
    regions: readonly PageRegion[],
    private readonly slotSize: number,
    private readonly zero: ZeroMap,
  ) {
    for (const r of regions) this.urgentPages[r.index] = new Uint8Array(r.pages);
  }

  /**
   * Queues region pages [first, first+count): urgent, the sweep's (`sweep`), or other background.
   * False when they only grew the last queued request (nothing new to send).
   */
  add(region: PageRegion, first: number, count: number, urgent: boolean, sweep: boolean): boolean {
    const per = Math.max(1, Math.floor(this.slotSize / region.pageSize));
    const queue = urgent ? this.urgent : sweep ? this.sweep : this.background;
    if (!urgent && this.extend(queue.at(-1), region, first, count)) return false;
    for (let k = first; k < first + count; k += per) {
      const req = this.make(region, k, Math.min(per, first + count - k), urgent, sweep);
      queue.push(req); // background (not sweep): fault-around neighbours and prefetch, sent before the sweep
      if (queue === this.sweep) this.sweepBytes += req.bytes;
    }
    return true;
  }

  /**
   * A vCPU waits on a page already requested in the background: ask for it again, alone, as
   * urgent. Whichever copy arrives first is installed; the other finds the page settled and is
   * dropped. False when an urgent request covers the page already.
   */
  hurry(region: PageRegion, page: number, sweep: boolean): boolean {
    if (this.urgentPages[region.index]![page]) return false;
    this.urgent.push(this.make(region, page, 1, true, sweep));
    return true;
  }

  /** The next background request to send: fault-around and prefetch before the sweep's. */
  nextBackground(): PageRequest | undefined {
    let req = this.background.shift();
    if (req === undefined) {
      req = this.sweep.shift();
      if (req === undefined) return undefined;
      this.sweepBytes -= req.bytes;
    }
    return req;
  }

  /** Requests a lost connection owed go out again first, in the order they were asked for. */
  putBack(urgent: boolean, reqs: PageRequest[]): void {
    if (urgent) this.urgent.unshift(...reqs);
    else this.background.unshift(...reqs);
  }

  /** The request is finished with: its pages may be hurried again. */
  finished(req: PageRequest): void {
    if (req.urgent) this.urgentPages[req.region.index]!.fill(0, req.first, req.first + req.count);
  }

  /** Empties every queue; returns what was queued. */
  drain(): PageRequest[] {
    const all = [...this.urgent, ...this.background, ...this.sweep];
    this.urgent.length = 0;
    this.background.length = 0;
    this.sweep.length = 0;
    this.sweepBytes = 0;
    return all;
  }

  private make(region: PageRegion, first: number, count: number, urgent: boolean, sweep: boolean): PageRequest {
    const ps = region.pageSize;
    if (urgent) this.urgentPages[region.index]!.fill(1, first, first + count);
    return {
      id: this.nextId++,
      region,
      first,
      count,
      start: region.offset + first * ps,
      bytes: count * ps,
      urgent,
      sweep,
      slot: undefined,
      cursor: 0,
      sent: false,
    };
  }

  /** Grows a queued (unsent) background request over [first, first+count) when only zero pages lie between. */
  private extend(last: PageRequest | undefined, region: PageRegion, first: number, count: number): boolean {
    if (last === undefined || last.sent || last.slot !== undefined || last.region !== region) return false;
    const end = last.first + last.count;
    const newCount = first + count - last.first;
    if (first < end || newCount * region.pageSize > this.slotSize) return false;
    const ipp = region.imagePagesPerPage;
    if (!this.zero.isRangeZero(region.firstImagePage + end * ipp, (first - end) * ipp)) return false;
    const grow = (newCount - last.count) * region.pageSize;
    last.count = newCount;
    last.bytes += grow;
    if (last.sweep) this.sweepBytes += grow;
    return true;
  }
}
