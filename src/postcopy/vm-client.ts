// One VM's side of postcopy: the PageRequester a VM's session asks for pages it does not have.
// Two connections per VM, like QEMU's postcopy-preempt channel: faults go on the urgent one, the
// background one pulls every page not installed yet (a bounded window in flight), then the VM's
// owner detaches the VM and closes this requester. Payloads land in slots (C memory) and go from
// there to UFFDIO_COPY. This class composes the parts and keeps the receive path (a DATA frame
// into its slot, then installed): the queues and their priorities (request-queues.ts), what is in
// flight (in-flight.ts), the slots (slot-pool.ts), the connections, their reconnects and the
// deadline (channel-pair.ts), and the background sweep (background-sweep.ts).
//
// If the page server goes away, requests stay outstanding (a vCPU waiting on a page keeps
// waiting: pages are never guessed), the channels reconnect with backoff and re-send them; a VM
// left without a page server for the deadline is failed (its owner kills its VMM). A frame
// that fails authentication (changed in transit) is the same to us: that connection is dropped,
// nothing of the request it belonged to is installed, and the request goes out again.
import type { EventLoop } from "../core/event-loop.ts";
import { errnoName } from "../core/ffi.ts";
import { IMAGE_PAGE, type ZeroMap } from "../sources/image/snapshot-image.ts";
import { formatBytes } from "../core/log.ts";
import { AGAIN, GONE, installErrno, installFailed, PAGE_IN_FLIGHT, type PageRegion as Region, type PageRequester, type RequesterContext, type RequesterVm } from "../sources/port.ts";
import type { HostPort } from "./address.ts";
import { BackgroundSweep } from "./background-sweep.ts";
import { BACKGROUND, ChannelPair, URGENT } from "./channel-pair.ts";
import { ClientChannel } from "./client-channel.ts";
import { InFlight } from "./in-flight.ts";
import { checkDataChunk, frame, type FrameHeader, FrameType, type ImageInfo, ProtocolError, Role } from "./protocol.ts";
import { type PageRequest as Req, RequestQueues } from "./request-queues.ts";
import { SlotPool } from "./slot-pool.ts";

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
const HANDSHAKE_TIMEOUT_MS = 5000;

export class VmClient implements PageRequester {
  private readonly loop: EventLoop;
  private readonly slots: SlotPool;
  private readonly queues: RequestQueues;
  private readonly inFlight = new InFlight<Req>();
  /** Requests sent and not answered yet, by id (the in-flight table's). */
  private readonly sent = this.inFlight.byId;
  private readonly link: ChannelPair;
  private readonly sweep: BackgroundSweep;
  /** Deliveries stopped by a pending REMOVE: installed again (what is still wanted) once it was read. */
  private readonly redeliveries: Req[] = [];
  private done = false;
  readonly counters = { requests: 0, bytes: 0, tampered: 0, reconnects: 0 };

  constructor(
    private readonly vm: RequesterVm,
    private readonly ctx: RequesterContext,
    private readonly target: RemoteTarget,
  ) {
    this.loop = ctx.loop;
    let biggestPage = IMAGE_PAGE;
    for (const r of vm.table.regions) biggestPage = Math.max(biggestPage, r.pageSize);
    const slotSize = Math.max(MIN_SLOT, biggestPage);
    this.slots = new SlotPool(slotSize);
    this.queues = new RequestQueues(vm.table.regions, slotSize, target.zero);
    this.sweep = new BackgroundSweep(vm, this.loop, target.sweep, (region) => Math.floor(slotSize / region.pageSize), {
      windowFull: () => this.inFlight.backgroundBytes + this.queues.sweepBytes >= BACKGROUND_WINDOW,
      queued: () => this.queues.sweep.length,
      send: () => this.sendBackground(),
      idle: () => this.sent.size + this.queues.urgent.length + this.queues.background.length + this.queues.sweep.length + this.redeliveries.length === 0,
      delivered: () => this.ctx.delivered(),
    });
    this.link = new ChannelPair(vm.id, ctx, target, this.counters, {
      open: (i) => this.connect(i),
      outstanding: () => this.sent.size + this.queues.urgent.length + this.queues.background.length,
      unanswered: () => this.sent.size + this.queues.urgent.length + this.queues.background.length + this.queues.sweep.length,
      owes: (i) => this.inFlight.owes(i === URGENT),
      takeBack: (i) => {
        const again = this.inFlight.takeBack(i === URGENT);
        this.queues.putBack(i === URGENT, again);
        return again.length;
      },
      resume: (i) => (i === URGENT ? this.sendUrgent() : this.sendBackground()),
    });
    this.link.start();
    this.sweep.schedule();
  }

  // ---- PageRequester ------------------------------------------------------------------------

  request(region: Region, first: number, count: number, urgent: boolean): void {
    if (this.done) return;
    const sweeping = this.sweep.sweeping;
    // Background runs split only by zero pages may just grow the last queued request.
    if (!this.queues.add(region, first, count, urgent, sweeping)) return;
    if (urgent) this.sendUrgent();
    else if (!sweeping) this.sendBackground();
  }

  hurry(region: Region, page: number): void {
    // The page is on its way in the background: ask for it again, alone, on the urgent channel.
    if (this.done || !this.queues.hurry(region, page, this.sweep.sweeping)) return;
    this.sendUrgent();
  }

  // ---- sending ------------------------------------------------------------------------------

  private sendUrgent(): void {
    const ch = this.link.ready(URGENT);
    if (ch === undefined) return;
    while (this.queues.urgent.length) this.send(this.queues.urgent.shift()!, ch);
  }

  private sendBackground(): void {
    const ch = this.link.ready(BACKGROUND);
    if (ch !== undefined) {
      while (this.inFlight.backgroundBytes < BACKGROUND_WINDOW) {
        const req = this.queues.nextBackground();
        if (req === undefined) break;
        this.send(req, ch, false);
      }
      ch.flush();
    }
    if (this.inFlight.backgroundBytes < BACKGROUND_WINDOW && this.queues.sweep.length === 0) this.sweep.schedule();
  }

  private send(req: Req, ch: ClientChannel, now = true): void {
    if (!this.stillWanted(req)) return this.release(req);
    req.slot ??= this.slots.take();
    req.cursor = 0; // a reply cut short by a lost connection starts over
    if (this.target.zero.isRangeZero(req.start / IMAGE_PAGE, req.bytes / IMAGE_PAGE)) {
      // Nothing of it would cross the wire (cannot happen for requests the VM makes; cheap to be sure).
      req.slot.bytes.fill(0, 0, req.bytes);
      return this.deliver(req);
    }
    // The silence and progress clocks of a connection start when it starts owing us something.
    if (!this.inFlight.owes(req.urgent)) this.link.startOwing(req.urgent ? URGENT : BACKGROUND, ch);
    this.inFlight.add(req);
    this.counters.requests++;
    ch.send(frame(FrameType.REQUEST, null, req.id, req.start, req.bytes), now);
  }

  /** False when every page of the request was installed or discarded meanwhile. */
  private stillWanted(req: Req): boolean {
    const state = req.region.state;
    for (let k = req.first; k < req.first + req.count; k++) if (state[k] === PAGE_IN_FLIGHT) return true;
    return false;
  }

  /** The request is finished with (delivered, or no longer wanted). */
  private release(req: Req): void {
    this.queues.finished(req);
    if (req.slot !== undefined) {
      this.slots.give(req.slot);
      req.slot = undefined;
    }
  }

  /** Forgets that a request was sent (reply complete, dropped, or its connection lost). */
  private unsend(req: Req): void {
    this.inFlight.remove(req);
  }

  /** Every id handed out is below this one (a DATA frame for a higher id is a protocol error). */
  private get nextId(): number {
    return this.queues.nextId;
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

  private requestError(id: number, message: string, wireCode: number): void {
    const req = this.sent.get(id);
    if (req === undefined) return;
    this.ctx.fail("BAD_FRAME", `page server ${this.target.url} refused image bytes [0x${req.start.toString(16)}, +${req.bytes}): ${message}`, {
      url: this.target.url, start: req.start, bytes: req.bytes, wireCode,
    });
  }

  private maybeRestartSweep(): void {
    this.sweep.restart();
  }

  // ---- connections --------------------------------------------------------------------------

  /** Opens connection i: its frames come to the receive path above, its state to the channel pair. */
  private connect(i: number): ClientChannel {
    const role = i === URGENT ? Role.URGENT : Role.BACKGROUND;
    const ch: ClientChannel = new ClientChannel(this.loop, this.target.addr, this.target.token, role, false, {
      ready: (info) => this.link.onReady(i, ch, info),
      dataTarget: (h) => this.dataTarget(h),
      data: (h) => {
        // Only bytes we still wait for are progress: a server replaying stale ids must not keep
        // a VM alive past its deadline.
        if (this.sent.has(h.id)) this.link.progress(i);
        this.onData(h);
      },
      requestError: (id, message, wireCode) => this.requestError(id, message, wireCode),
      lost: (reason, kind) => this.link.onLost(i, reason, kind),
    }, Math.min(HANDSHAKE_TIMEOUT_MS, this.target.deadlineMs));
    return ch;
  }

  // ---- the end --------------------------------------------------------------------------------

  /** The VM's owner closes us once the VM is detached or gone (possibly from inside a call of ours). */
  private finishedWithVm(): boolean {
    return this.done;
  }

  close(): void {
    if (this.done) return;
    this.done = true;
    this.sweep.stop();
    this.link.close();
    this.slots.close();
    for (const req of [...this.sent.values(), ...this.queues.drain(), ...this.redeliveries]) this.release(req);
    this.sent.clear();
    this.redeliveries.length = 0;
    const c = this.counters;
    this.ctx.logger.debug(
      "remote.done",
      `vm ${this.vm.id}: page server ${this.target.url}: ${c.requests} requests, ${formatBytes(c.bytes)} received, ${c.tampered} connections dropped for frames failing authentication, ${c.reconnects} reconnects`,
      { vm: this.vm.id, url: this.target.url, requests: c.requests, bytes: c.bytes, tampered: c.tampered, reconnects: c.reconnects },
    );
  }
}
