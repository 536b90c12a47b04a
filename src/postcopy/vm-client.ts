// One VM's side of postcopy: the PageRequester a VM's session asks for pages it does not have.
// Two connections per VM, like QEMU's postcopy-preempt channel: faults go on the urgent one,
// so they never queue behind background bytes already sitting in kernel socket buffers; the
// background one pulls every page not installed yet (a bounded window in flight), then the
// VM's owner detaches the VM and closes this requester. Payloads land in slots (C memory) and go from there to UFFDIO_COPY.
//
// If the page server goes away, requests stay outstanding (a vCPU waiting on a page keeps
// waiting: pages are never guessed), the channels reconnect with backoff and re-send them; a VM
// left without a page server for the deadline is failed (its owner kills its VMM). A frame
// that fails authentication (changed in transit) is the same to us: that connection is dropped,
// nothing of the request it belonged to is installed, and the request goes out again.
import type { EventLoop } from "../core/event-loop.ts";
import { errnoName, NativeBuffer } from "../core/ffi.ts";
import { IMAGE_PAGE, type ZeroMap } from "../sources/image/snapshot-image.ts";
import { formatBytes } from "../core/log.ts";
import { AGAIN, GONE, installErrno, installFailed, PAGE_IN_FLIGHT, type PageRegion as Region, type PageRequester, type RequesterContext, type RequesterVm } from "../sources/port.ts";
import type { HostPort } from "./address.ts";
import { ClientChannel, type LostKind } from "./client-channel.ts";
import { SweepOrder } from "../scheduler/sweep-order.ts";
import { checkDataChunk, frame, type FrameHeader, FrameType, type ImageInfo, ProtocolError, Role } from "./protocol.ts";

export interface RemoteTarget {
  url: string;
  addr: HostPort;
  token: Buffer;
  /** What the page server said at startup; every later connection must say the same. */
  info: ImageInfo;
  zero: ZeroMap;
  deadlineMs: number;
  /** Pull every page the VM has not touched (background completion, then detach). */
  sweep: boolean;
}

/** Smallest slot: one request's bytes (a 2 MiB page needs a 2 MiB slot). */
const MIN_SLOT = 512 * 1024;
/** Background bytes requested and not yet delivered: enough to keep a fast link busy. */
const BACKGROUND_WINDOW = 8 * 1024 * 1024;
/** Region pages the sweep looks at per turn, so a mostly-installed VM does not stall faults. */
const SWEEP_PAGES_PER_TURN = 16_384;
const RECONNECT_FIRST_MS = 50;
const RECONNECT_MAX_MS = 1000;
const HANDSHAKE_TIMEOUT_MS = 5000;
/** A connection silent this long while it owes us replies is given up (then pinged at half of it). */
const DEAD_AFTER_MAX_MS = 5000;
const DEAD_AFTER_MIN_MS = 500;
/** How often connection health and the deadline are looked at. */
const TICK_MAX_MS = 250;
const FREE_SLOTS_KEPT = 32;

const URGENT = 0;
const BACKGROUND = 1;
const CHANNEL_NAMES = ["urgent", "background"];

interface Req {
  id: number;
  region: Region;
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

export class VmClient implements PageRequester {
  private readonly loop: EventLoop;
  private readonly channels: (ClientChannel | undefined)[] = [undefined, undefined];
  private readonly sent = new Map<number, Req>();
  private nextId = 1;
  private readonly urgentQueue: Req[] = [];
  private readonly backgroundQueue: Req[] = [];
  private readonly sweepQueue: Req[] = [];
  private sweepQueuedBytes = 0;
  private urgentInFlight = 0;
  private backgroundInFlight = 0;
  /** Per region (by index): 1 where an urgent request covers the page (no second hurry). */
  private readonly urgentPages: Uint8Array[] = [];
  private readonly slotSize: number;
  private readonly freeSlots: NativeBuffer[] = [];
  private readonly redeliveries: Req[] = [];
  private sweeping = false;
  private sweepScheduled = false;
  /** The sweep's order (shared with the populator and the QEMU sink): regions in slot-sized spans, pass after pass. */
  private readonly sweepOrder: SweepOrder;
  private readonly regionSettled: (u: number) => boolean;
  /** The current pass is over; another starts only if the last one asked for something. */
  private passOver = false;
  private requestedThisPass = 0;
  private readonly backoff = [RECONNECT_FIRST_MS, RECONNECT_FIRST_MS];
  private readonly cancelReconnect: ((() => void) | undefined)[] = [undefined, undefined];
  /**
   * Since when this VM has been without a working page server: set when a connection is lost
   * (or was never up), cleared only by progress (a DATA frame, or both connections up with
   * nothing owed). A server that reconnects but never delivers is still "without".
   */
  private stallSince: number | undefined;
  /** Per connection: the last DATA frame, or when it started owing us replies. */
  private readonly waitingSince = [0, 0];
  private readonly deadAfterMs: number;
  private lastError = "not connected yet";
  private everConnected = false;
  private outageLogged = false;
  private cancelTick: () => void = () => {};
  private done = false;
  readonly counters = { requests: 0, bytes: 0, tampered: 0, reconnects: 0 };

  constructor(
    private readonly vm: RequesterVm,
    private readonly ctx: RequesterContext,
    private readonly target: RemoteTarget,
  ) {
    this.loop = ctx.loop;
    let biggestPage = IMAGE_PAGE;
    for (const r of vm.table.regions) {
      this.urgentPages[r.index] = new Uint8Array(r.pages);
      biggestPage = Math.max(biggestPage, r.pageSize);
    }
    this.slotSize = Math.max(MIN_SLOT, biggestPage);
    const regions = vm.table.regions;
    this.sweepOrder = new SweepOrder(regions.length, (u) => regions[u]!.pages, (u) => Math.floor(this.slotSize / regions[u]!.pageSize));
    this.regionSettled = (u) => regions[u]!.settled === regions[u]!.pages;
    // Until the page server delivers, the VM is "without a page server": the deadline runs.
    this.stallSince = performance.now();
    this.deadAfterMs = Math.max(DEAD_AFTER_MIN_MS, Math.min(DEAD_AFTER_MAX_MS, target.deadlineMs / 2));
    this.connect(URGENT);
    this.connect(BACKGROUND);
    this.tick();
    this.scheduleSweep();
  }

  // ---- PageRequester ------------------------------------------------------------------------

  request(region: Region, first: number, count: number, urgent: boolean): void {
    if (this.done) return;
    const per = Math.max(1, Math.floor(this.slotSize / region.pageSize));
    const queue = urgent ? this.urgentQueue : this.sweeping ? this.sweepQueue : this.backgroundQueue;
    // Background runs split only by zero pages become one request: the server skips zero pages anyway.
    if (!urgent && this.extend(queue.at(-1), region, first, count)) return;
    for (let k = first; k < first + count; k += per) {
      const req = this.newRequest(region, k, Math.min(per, first + count - k), urgent);
      queue.push(req); // background (not sweep): fault-around neighbours and prefetch, sent before the sweep
      if (queue === this.sweepQueue) this.sweepQueuedBytes += req.bytes;
    }
    if (urgent) this.sendUrgent();
    else if (!this.sweeping) this.sendBackground();
  }

  /** Grows a queued (unsent) background request over [first, first+count) when only zero pages lie between. */
  private extend(last: Req | undefined, region: Region, first: number, count: number): boolean {
    if (last === undefined || last.sent || last.slot !== undefined || last.region !== region) return false;
    const end = last.first + last.count;
    const newCount = first + count - last.first;
    if (first < end || newCount * region.pageSize > this.slotSize) return false;
    const ipp = region.imagePagesPerPage;
    if (!this.target.zero.isRangeZero(region.firstImagePage + end * ipp, (first - end) * ipp)) return false;
    const grow = (newCount - last.count) * region.pageSize;
    last.count = newCount;
    last.bytes += grow;
    if (last.sweep) this.sweepQueuedBytes += grow;
    return true;
  }

  hurry(region: Region, page: number): void {
    if (this.done || this.urgentPages[region.index]![page]) return;
    // The page is on its way in the background: ask for it again, alone, on the urgent channel.
    // Whichever copy arrives first is installed; the other finds the page settled and is dropped.
    this.urgentQueue.push(this.newRequest(region, page, 1, true));
    this.sendUrgent();
  }

  private newRequest(region: Region, first: number, count: number, urgent: boolean): Req {
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
      sweep: this.sweeping,
      slot: undefined,
      cursor: 0,
      sent: false,
    };
  }

  // ---- sending ------------------------------------------------------------------------------

  private sendUrgent(): void {
    const ch = this.channels[URGENT];
    if (!ch?.ready) return;
    while (this.urgentQueue.length) this.send(this.urgentQueue.shift()!, ch);
  }

  private sendBackground(): void {
    const ch = this.channels[BACKGROUND];
    if (ch?.ready) {
      while (this.backgroundInFlight < BACKGROUND_WINDOW) {
        let req = this.backgroundQueue.shift();
        if (req === undefined) {
          req = this.sweepQueue.shift();
          if (req === undefined) break;
          this.sweepQueuedBytes -= req.bytes;
        }
        this.send(req, ch, false);
      }
      ch.flush();
    }
    if (this.backgroundInFlight < BACKGROUND_WINDOW && this.sweepQueue.length === 0) this.scheduleSweep();
  }

  private send(req: Req, ch: ClientChannel, now = true): void {
    if (!this.stillWanted(req)) return this.release(req);
    req.slot ??= this.takeSlot();
    req.cursor = 0; // a reply cut short by a lost connection starts over
    if (this.target.zero.isRangeZero(req.start / IMAGE_PAGE, req.bytes / IMAGE_PAGE)) {
      // Nothing of it would cross the wire (cannot happen for requests the VM makes; cheap to be sure).
      req.slot.bytes.fill(0, 0, req.bytes);
      return this.deliver(req);
    }
    req.sent = true;
    this.sent.set(req.id, req);
    // The silence and progress clocks of a connection start when it starts owing us something.
    if ((req.urgent ? this.urgentInFlight : this.backgroundInFlight) === 0) {
      ch.lastRxAt = performance.now();
      this.waitingSince[req.urgent ? URGENT : BACKGROUND] = ch.lastRxAt;
    }
    if (req.urgent) this.urgentInFlight++;
    else this.backgroundInFlight += req.bytes;
    this.counters.requests++;
    ch.send(frame(FrameType.REQUEST, null, req.id, req.start, req.bytes), now);
  }

  /** False when every page of the request was installed or discarded meanwhile. */
  private stillWanted(req: Req): boolean {
    const state = req.region.state;
    for (let k = req.first; k < req.first + req.count; k++) if (state[k] === PAGE_IN_FLIGHT) return true;
    return false;
  }

  private takeSlot(): NativeBuffer {
    return this.freeSlots.pop() ?? new NativeBuffer(this.slotSize);
  }

  /** The request is finished with (delivered, or no longer wanted). */
  private release(req: Req): void {
    if (req.urgent) {
      const flags = this.urgentPages[req.region.index]!;
      flags.fill(0, req.first, req.first + req.count);
    }
    if (req.slot !== undefined) {
      if (this.freeSlots.length < FREE_SLOTS_KEPT && !this.done) this.freeSlots.push(req.slot);
      else req.slot.free();
      req.slot = undefined;
    }
  }

  /** Forgets that a request was sent (reply complete, dropped, or its connection lost). */
  private unsend(req: Req): void {
    if (!this.sent.delete(req.id)) return;
    req.sent = false;
    if (req.urgent) this.urgentInFlight--;
    else this.backgroundInFlight -= req.bytes;
  }

  // ---- receiving ----------------------------------------------------------------------------

  /** Where a DATA payload goes: straight into its request's slot, at its offset. */
  private dataTarget(h: FrameHeader): number {
    const req = this.sent.get(h.id);
    if (req === undefined) {
      // A request given up (its pages settled by another reply): its late chunks are dropped.
      if (h.id > 0 && h.id < this.nextId) return -1;
      throw new ProtocolError(`DATA for request ${h.id}, which was never made`);
    }
    // Zero pages never cross the wire: the chunk holds data pages only, and what it skipped is zero.
    checkDataChunk(h.id, h.offset, h.length, req.cursor, req.start, req.bytes, this.target.zero);
    return req.slot!.address + h.offset;
  }

  private onData(h: FrameHeader): void {
    const req = this.sent.get(h.id);
    if (req === undefined) return;
    // Authenticated and decrypted in place by the reader before we hear of it.
    this.counters.bytes += h.length;
    req.cursor = h.offset + h.length;
    const restFirst = (req.start + req.cursor) / IMAGE_PAGE;
    const restCount = (req.bytes - req.cursor) / IMAGE_PAGE;
    if (restCount === 0 || this.target.zero.isRangeZero(restFirst, restCount)) this.complete(req);
  }

  private complete(req: Req): void {
    this.unsend(req);
    const region = req.region;
    if (region.imagePagesPerPage > 1) {
      // A huge page mixing data and zero 4 KiB pages: the zero ones never came; write them.
      for (const run of this.target.zero.runs(req.start / IMAGE_PAGE, req.bytes / IMAGE_PAGE)) {
        if (run.zero) req.slot!.bytes.fill(0, run.first * IMAGE_PAGE - req.start, (run.first + run.count) * IMAGE_PAGE - req.start);
      }
    }
    this.deliver(req);
  }

  private deliver(req: Req): void {
    const region = req.region;
    const before = region.settled;
    const r = this.vm.deliver(region, req.first, req.count, req.slot!.address);
    if (!req.urgent) this.vm.stats.populatedPages += region.settled - before;
    if (r === AGAIN) {
      // A REMOVE is pending: let the server read it, then install what is still wanted from the same bytes.
      this.redeliveries.push(req);
      this.ctx.delivered();
      if (!this.done) this.loop.after(1, () => this.redeliver());
      return;
    }
    this.release(req);
    if (installFailed(r)) return this.ctx.fail("SYSCALL", `installing pages fetched from ${this.target.url} failed: ${errnoName(installErrno(r))}`);
    this.ctx.delivered();
    if (this.finishedWithVm()) return;
    if (r === GONE) return;
    if (!req.urgent) this.sendBackground();
    this.maybeRestartSweep();
  }

  private redeliver(): void {
    if (this.done) return;
    for (const req of this.redeliveries.splice(0)) {
      if (this.done) return;
      if (this.stillWanted(req)) this.deliver(req);
      else this.release(req);
    }
  }

  private requestError(id: number, message: string): void {
    const req = this.sent.get(id);
    if (req === undefined) return;
    this.ctx.fail("BAD_FRAME", `page server ${this.target.url} refused image bytes [0x${req.start.toString(16)}, +${req.bytes}): ${message}`);
  }

  // ---- background completion ---------------------------------------------------------------

  private scheduleSweep(): void {
    if (!this.target.sweep || this.sweepScheduled || this.done || this.passOver) return;
    this.sweepScheduled = true;
    this.loop.after(0, () => {
      this.sweepScheduled = false;
      this.sweep();
    });
  }

  /** Requests the next missing pages, in image order, while the background window has room. */
  private sweep(): void {
    if (this.done) return;
    const regions = this.vm.table.regions;
    let looked = 0;
    this.sweeping = true;
    try {
      const order = this.sweepOrder;
      while (!this.passOver) {
        if (this.backgroundInFlight + this.sweepQueuedBytes >= BACKGROUND_WINDOW) break;
        if (looked >= SWEEP_PAGES_PER_TURN) {
          this.sweeping = false;
          this.scheduleSweep();
          break;
        }
        if (!order.next(this.regionSettled)) {
          this.passOver = true;
          break;
        }
        const region = regions[order.unit]!;
        const before = region.settled;
        const queued = this.sweepQueue.length;
        const r = this.vm.installMissing(region, order.from, order.to, 0);
        this.vm.stats.populatedPages += region.settled - before; // zero pages, installed right here
        this.requestedThisPass += this.sweepQueue.length - queued;
        if (r === AGAIN) {
          // A REMOVE is pending; the VM's owner reads it before our next turn, then this span again.
          order.again();
          this.loop.after(1, () => this.scheduleSweep());
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
    this.sendBackground();
    // Zero pages alone may have completed the VM.
    if (this.vm.table.complete) this.ctx.delivered();
    if (!this.finishedWithVm()) this.maybeRestartSweep();
  }

  /**
   * One pass is not always enough: pages that met a pending REMOVE went back to missing. When a
   * pass is over and nothing is in flight, start another, as long as the last one asked for something.
   */
  private maybeRestartSweep(): void {
    if (!this.passOver || this.vm.table.complete) return;
    if (this.sent.size || this.urgentQueue.length || this.backgroundQueue.length || this.sweepQueue.length || this.redeliveries.length) return;
    if (this.requestedThisPass === 0) return;
    this.requestedThisPass = 0;
    this.passOver = false; // the order starts its next pass from the first region
    this.scheduleSweep();
  }

  // ---- connections --------------------------------------------------------------------------

  private connect(i: number): void {
    this.cancelReconnect[i] = undefined;
    if (this.done) return;
    const role = i === URGENT ? Role.URGENT : Role.BACKGROUND;
    const ch: ClientChannel = new ClientChannel(this.loop, this.target.addr, this.target.token, role, false, {
      ready: (info) => this.onReady(i, ch, info),
      dataTarget: (h) => this.dataTarget(h),
      data: (h) => {
        // Only bytes we still wait for are progress: a server replaying stale ids must not keep
        // a VM alive past its deadline.
        if (this.sent.has(h.id)) this.progress(i);
        this.onData(h);
      },
      requestError: (id, message) => this.requestError(id, message),
      lost: (reason, kind) => this.onLost(i, reason, kind),
    }, Math.min(HANDSHAKE_TIMEOUT_MS, this.target.deadlineMs));
    this.channels[i] = ch;
  }

  private onReady(i: number, ch: ClientChannel, info: ImageInfo): void {
    const want = this.target.info;
    if (info.size !== want.size || info.pages !== want.pages || !sameBytes(info.id, want.id)) {
      ch.close();
      this.channels[i] = undefined;
      return this.ctx.fail("BAD_FRAME", `page server ${this.target.url} now serves a different image (${info.size} bytes, id ${hex(info.id)}; this VM was started from ${want.size} bytes, id ${hex(want.id)})`);
    }
    this.backoff[i] = RECONNECT_FIRST_MS;
    if (this.channels.every((c) => c?.ready)) {
      this.everConnected = true;
      // Back in business if nothing is owed; otherwise the first DATA frame says so.
      if (this.sent.size + this.urgentQueue.length + this.backgroundQueue.length === 0) this.recovered();
    }
    if (i === URGENT) this.sendUrgent();
    else this.sendBackground();
  }

  private onLost(i: number, reason: string, kind: LostKind, quietMs = 0): void {
    this.channels[i] = undefined;
    if (this.done) return;
    this.lastError = reason;
    // Whatever was sent on that connection goes out again, first, in the order it was asked for.
    const again: Req[] = [];
    for (const req of this.sent.values()) if ((req.urgent ? URGENT : BACKGROUND) === i) again.push(req);
    for (const req of again) this.unsend(req);
    again.sort((a, b) => a.id - b.id);
    if (i === URGENT) this.urgentQueue.unshift(...again);
    else this.backgroundQueue.unshift(...again);
    this.stallSince ??= performance.now() - quietMs;
    if (kind === "tampered") {
      // Every one is worth a line: someone on the path changes, replays or cuts our traffic.
      this.counters.tampered++;
      this.ctx.logger.error(
        "remote.tampered",
        `vm ${this.vm.id}: ${CHANNEL_NAMES[i]} channel to ${this.target.url}: ${reason}; nothing of it installed, connection dropped, ` +
          `${again.length} requests to re-send (the VM is killed if the page server does not deliver within ${this.target.deadlineMs} ms)`,
        { vm: this.vm.id, url: this.target.url, channel: CHANNEL_NAMES[i], reason, resend: again.length, deadlineMs: this.target.deadlineMs },
      );
    } else if (!this.outageLogged) {
      this.outageLogged = true;
      const level = kind === "auth" || kind === "version" || kind === "protocol" ? "error" : "warn";
      this.ctx.logger.log(
        level,
        "remote.lost",
        `vm ${this.vm.id}: ${this.everConnected ? "lost the" : "cannot reach the"} page server ${this.target.url} (${CHANNEL_NAMES[i]} channel: ${reason}); ` +
          `${again.length} requests to re-send; reconnecting, the VM is killed if it is not back within ${this.target.deadlineMs} ms`,
        { vm: this.vm.id, url: this.target.url, channel: CHANNEL_NAMES[i], reason, kind, resend: again.length, deadlineMs: this.target.deadlineMs, connected: this.everConnected },
      );
    } else {
      this.ctx.logger.debug("remote.channel_lost", `vm ${this.vm.id}: ${CHANNEL_NAMES[i]} channel: ${reason}`, { vm: this.vm.id, channel: CHANNEL_NAMES[i], reason, kind });
    }
    const delay = this.backoff[i]!;
    this.backoff[i] = Math.min(RECONNECT_MAX_MS, delay * 2);
    this.cancelReconnect[i] = this.loop.after(delay, () => this.connect(i));
  }

  /** A DATA frame arrived on connection i: the page server delivers. */
  private progress(i: number): void {
    this.waitingSince[i] = performance.now();
    if (this.stallSince !== undefined && this.channels.every((c) => c?.ready)) this.recovered();
  }

  private recovered(): void {
    if (this.stallSince === undefined) return;
    const stalled = performance.now() - this.stallSince;
    this.stallSince = undefined;
    if (this.outageLogged) {
      this.counters.reconnects++;
      this.ctx.logger.info("remote.back", `vm ${this.vm.id}: page server ${this.target.url} is back after ${stalled.toFixed(0)} ms; outstanding requests re-sent`, {
        vm: this.vm.id, url: this.target.url, stalledMs: stalled,
      });
    } else {
      this.ctx.logger.debug("remote.delivering", `vm ${this.vm.id}: page server ${this.target.url} delivering after ${stalled.toFixed(1)} ms`, {
        vm: this.vm.id, url: this.target.url, stalledMs: stalled,
      });
    }
    this.outageLogged = false;
  }

  private giveUp(why: string): void {
    if (this.done) return;
    const waiting = this.sent.size + this.urgentQueue.length + this.backgroundQueue.length + this.sweepQueue.length;
    this.ctx.fail("PEER_GONE", `${why} (last: ${this.lastError}); ${waiting} requests unanswered`);
  }

  /**
   * Connection health, a few times a second: ping a connection that owes us replies and has
   * been quiet; give it up when silent for too long; fail the VM past the deadline.
   */
  private tick(): void {
    const every = Math.min(TICK_MAX_MS, this.target.deadlineMs / 4);
    this.cancelTick = this.loop.after(every, () => {
      if (this.done) return;
      const now = performance.now();
      const deadline = this.target.deadlineMs;
      for (let i = 0; i < 2; i++) {
        const ch = this.channels[i];
        if (!ch?.ready) continue;
        const owed = i === URGENT ? this.urgentInFlight > 0 : this.backgroundInFlight > 0;
        if (!owed) continue;
        const quiet = now - ch.lastRxAt;
        if (quiet >= this.deadAfterMs) {
          ch.close();
          this.onLost(i, `no reply for ${(quiet / 1000).toFixed(1)} s`, "timeout", quiet);
          if (this.done) return;
        } else if (quiet >= this.deadAfterMs / 2) {
          ch.ping();
        } else if (now - this.waitingSince[i]! >= deadline) {
          // It answers pings but sends no pages.
          this.lastError = `no page data on the ${CHANNEL_NAMES[i]} connection for ${(deadline / 1000).toFixed(1)} s`;
          return this.giveUp(`page server ${this.target.url} delivered nothing for ${deadline} ms`);
        }
      }
      if (this.stallSince !== undefined && now - this.stallSince >= deadline) {
        if (!this.channels.every((c) => c?.ready)) return this.giveUp(`no page server at ${this.target.url} for ${deadline} ms`);
        this.lastError = "connected and authenticated, but no page data came";
        return this.giveUp(`page server ${this.target.url} delivered nothing for ${deadline} ms`);
      }
      this.tick();
    });
  }

  // ---- the end --------------------------------------------------------------------------------

  /** The VM's owner closes us once the VM is detached or gone (possibly from inside a call of ours). */
  private finishedWithVm(): boolean {
    return this.done;
  }

  close(): void {
    if (this.done) return;
    this.done = true;
    this.cancelTick();
    for (let i = 0; i < 2; i++) {
      this.cancelReconnect[i]?.();
      this.channels[i]?.close();
      this.channels[i] = undefined;
    }
    for (const req of [...this.sent.values(), ...this.urgentQueue, ...this.backgroundQueue, ...this.sweepQueue, ...this.redeliveries]) this.release(req);
    this.sent.clear();
    this.urgentQueue.length = 0;
    this.backgroundQueue.length = 0;
    this.sweepQueue.length = 0;
    this.sweepQueuedBytes = 0;
    this.redeliveries.length = 0;
    for (const s of this.freeSlots.splice(0)) s.free();
    const c = this.counters;
    this.ctx.logger.debug(
      "remote.done",
      `vm ${this.vm.id}: page server ${this.target.url}: ${c.requests} requests, ${formatBytes(c.bytes)} received, ${c.tampered} connections dropped for frames failing authentication, ${c.reconnects} reconnects`,
      { vm: this.vm.id, url: this.target.url, requests: c.requests, bytes: c.bytes, tampered: c.tampered, reconnects: c.reconnects },
    );
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString("hex").slice(0, 16);
}
