// The QEMU page sink: plays the postcopy migration SOURCE for an unmodified QEMU destination.
// Sends the minimal order of docs/qemu-postcopy-source.md §3.2, then answers the guest's
// page requests first (on the preempt channel when there is one) while every other page streams
// in the background, each page exactly once across all channels (§4: a second copy is fatal).
import { connect, type Socket } from "node:net";
import { toArrayBuffer, type Pointer } from "bun:ffi";
import { SnaploadError } from "../../core/errors.ts";
import type { ImageBackend } from "../../sources/port.ts";
import type { Logger } from "../../core/log.ts";
import type { ZeroMap } from "../../sources/image/snapshot-image.ts";
import { windowEnd, windowStart } from "../../scheduler/fault-window.ts";
import { PrefetchOrder } from "../../scheduler/prefetch-order.ts";
import { SweepOrder } from "../../scheduler/sweep-order.ts";
import {
  Bytes,
  Cmd,
  ReturnPathDecoder,
  RpError,
  TARGET_PAGE,
  advise,
  command,
  discard,
  endHeader,
  eof,
  packaged,
  pageRecord,
  partHeader,
  ping,
  ramStart,
  sectionTail,
  type RpMessage,
  type StreamBlock,
} from "./stream.ts";

export class MigrationError extends SnaploadError {
  constructor(message: string, context: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super("MIGRATION", message, context, options);
    this.name = "MigrationError";
  }
}

/** unix:PATH or tcp:HOST:PORT, as QEMU's migrate-incoming takes it. */
export type MigrationAddress = { kind: "unix"; path: string } | { kind: "tcp"; host: string; port: number };

export function parseMigrationAddress(s: string): MigrationAddress {
  if (s.startsWith("unix:") && s.length > 5) return { kind: "unix", path: s.slice(5) };
  const m = s.match(/^tcp:(\[[^\]]+\]|[^:]+):(\d{1,5})$/);
  if (m && Number(m[2]) > 0 && Number(m[2]) < 65536) return { kind: "tcp", host: m[1]!.replace(/^\[|\]$/g, ""), port: Number(m[2]) };
  throw new SnaploadError("BAD_CONFIG", `"${s}" is not a migration address: use unix:PATH or tcp:HOST:PORT`);
}

export function formatMigrationAddress(a: MigrationAddress): string {
  return a.kind === "unix" ? `unix:${a.path}` : `tcp:${a.host}:${a.port}`;
}

/**
 * The page bytes of every block, wherever they come from: a local file's mapping (every page at
 * hand), or a remote snapshot (a page server, an object store) whose pages are present only once
 * fetched and verified. The sink sends a page only when `bytes` has it.
 */
export interface BlockPages {
  /** Per block: the 4 KiB pages the snapshot says are zero (never read, never fetched). */
  readonly zero: ZeroMap[];
  /** Page `page` of block `bi`, present and verified; undefined while it is not here. */
  bytes(bi: number, page: number): Uint8Array | undefined;
  /** Remote only: fetch data pages [first, first+count) of block bi; `arrived` follows. `urgent`: the guest waits. */
  fetch?(bi: number, first: number, count: number, urgent: boolean): void;
  /** The page was sent: its bytes may go. */
  sent?(bi: number, page: number): void;
}

/** What a remote BlockPages tells the sink. */
export interface PageArrivals {
  /** Pages [first, first+count) of block bi are present now. */
  arrived(bi: number, first: number, count: number): void;
  /** They cannot be had (the source gave up): the restore fails. */
  fail(e: Error): void;
}

/** The blocks, opened only once the device state is on its way (QEMU loads it meanwhile). */
export type OpenBlocks = (arrivals: PageArrivals) => BlockPages;

/** BlockPages over local page backends (the mapped-ram file's blocks, as `serve` opens them). */
export function localPages(backends: ImageBackend[]): BlockPages {
  // One view over each block's mapping; only pages the zero map calls data are ever read.
  const views = backends.map((b) => (b.base === 0 ? undefined : new Uint8Array(toArrayBuffer(b.base as Pointer, 0, b.size))));
  return {
    zero: backends.map((b) => b.zero),
    bytes: (bi, page) => views[bi]?.subarray(page * TARGET_PAGE, (page + 1) * TARGET_PAGE),
  };
}

export interface SinkOptions {
  sectionId: number;
  header: Uint8Array;
  deviceState: Uint8Array;
  pageSizeSummary: number;
  preempt: boolean;
  /** Neighbouring 4 KiB pages sent with each request (aligned window; 1 = the page alone). */
  faultAround: number;
  logger: Logger;
  /** Pages to send first, in order, right after the device state (a recorded working set, in whole-snapshot pages). */
  prefetch?: Uint32Array;
  /**
   * Send ZERO records for zero pages in the background too, as QEMU's own source does. By default
   * they are sent only when requested: pages never sent read as zero once the destination
   * unregisters its RAM at the end (doc §4, option b), which saves it one ioctl per zero page.
   */
  sendZeroPages?: boolean;
  /** Caps the background stream (bytes/s), like QEMU's max-postcopy-bandwidth; requests are not capped. */
  backgroundRate?: number;
  /**
   * The background stream waits for this (the guest seen running): until then the CPU goes to
   * QEMU loading the device state, not to pages it cannot read yet. Requests are served meanwhile.
   */
  backgroundAfter?: Promise<unknown>;
  /** Called for every page the guest requests (block index, 4 KiB page), in request order. */
  onRequest?: (block: number, page: number) => void;
}

export interface SinkStats {
  requests: number;
  /** Requests for pages already on their way (sent in the background before the request). */
  requestsInFlight: number;
  pagesOnRequest: number;
  pagesBackground: number;
  pagesPrefetched: number;
  bytesMain: number;
  bytesPreempt: number;
  latenciesMs: number[];
  packageSentMs: number;
  eofSentMs: number;
  shutMs: number;
}

const CHUNK_PAGES = 64;
const CHUNK_BYTES = CHUNK_PAGES * (TARGET_PAGE + 16) + 300; // records of up to 64 pages + framing
const HIGH_WATER = 512 * 1024; // bytes queued in our socket buffer before the background waits
// Background chunks are reused once written: a fresh 256 KiB buffer per chunk costs its page
// faults and the GC, which made the stream 30x slower than the copies themselves.
const POOL_CHUNKS = 8;
/** Background data pages fetched from a remote source and not yet arrived (8 MiB). */
const FETCH_WINDOW_PAGES = 2048;
const PONG_TIMEOUT_MS = 10_000;

function connectTo(addr: MigrationAddress, channel = "main"): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = addr.kind === "unix" ? connect(addr.path) : connect(addr.port, addr.host);
    s.once("connect", () => {
      s.removeAllListeners("error");
      resolve(s);
    });
    s.once("error", (e: NodeJS.ErrnoException) =>
      reject(
        new MigrationError(
          channel === "main"
            ? `cannot connect to the destination's migration address ${formatMigrationAddress(addr)}: ${e.code ?? e.message}`
            : `cannot open the ${channel} channel to ${formatMigrationAddress(addr)} (${e.code ?? e.message}): the destination stopped listening, so it refused the stream so far (see QEMU's stderr)`,
          {},
          { cause: e },
        ),
      ),
    );
  });
}

export class QemuPageSink {
  readonly stats: SinkStats = {
    requests: 0,
    requestsInFlight: 0,
    pagesOnRequest: 0,
    pagesBackground: 0,
    pagesPrefetched: 0,
    bytesMain: 0,
    bytesPreempt: 0,
    latenciesMs: [],
    packageSentMs: 0,
    eofSentMs: 0,
    shutMs: 0,
  };
  #pages: BlockPages | undefined;
  readonly #streamBlocks: StreamBlock[];
  readonly #open: OpenBlocks;
  readonly #byName: Map<string, number>;
  readonly #sent: Uint8Array[];
  /** Remote sources: pages asked for (1 in the background, 2 urgently), not yet arrived. */
  readonly #fetching: Uint8Array[];
  #fetchingBackground = 0;
  /** Remote sources: requested pages waiting for their bytes -> when the request came (-1: a neighbour). */
  readonly #waiting = new Map<number, number>();
  /** Remote sources: pages that arrived for the background, to send in arrival order. */
  #arrived: number[] = [];
  #arrivedAt = 0;
  /** First whole-snapshot page of each block (working-set page numbers). */
  readonly #blockStart: number[] = [];
  readonly #totalPages: number;
  /** Pages the stream must carry before it can end: data pages (plus zero pages with sendZeroPages). */
  #mustSend = 0;
  #sentPages = 0;
  #mustSent = 0;
  #main: Socket | undefined;
  #pre: Socket | undefined;
  #preLastBlock = -1;
  readonly #sweep: SweepOrder;
  #sweepBusy = false;
  #passProgress = false;
  /** The current pass began at the first page and the sweep has not jumped since. */
  #passWhole = true;
  /** A whole pass found nothing to send or fetch: every page is sent or on its way, for good. */
  #sweepIdle = false;
  readonly #prefetch: PrefetchOrder | undefined;
  #prefetchStep: Uint32Array = new Uint32Array(0);
  #prefetchAt = 0;
  #eofSent = false;
  /** The background waits for backgroundAfter. */
  #held: boolean;
  #finished = false;
  #t0 = 0;
  #pong1: (() => void) | undefined;
  #rateStart = 0;
  #rateBytes = 0;
  #rateTimer: ReturnType<typeof setTimeout> | undefined;
  readonly #pool: Buffer[] = Array.from({ length: POOL_CHUNKS }, () => Buffer.allocUnsafe(CHUNK_BYTES));
  #done!: { resolve: () => void; reject: (e: Error) => void };
  readonly #rp = new ReturnPathDecoder();

  constructor(
    blocks: StreamBlock[],
    open: OpenBlocks,
    private readonly opts: SinkOptions,
  ) {
    this.#streamBlocks = blocks;
    this.#open = open;
    this.#held = opts.backgroundAfter !== undefined;
    this.#byName = new Map(blocks.map((b, i) => [b.name, i]));
    this.#sent = blocks.map((b) => new Uint8Array(b.usedLength / TARGET_PAGE));
    this.#fetching = blocks.map((b) => new Uint8Array(b.usedLength / TARGET_PAGE));
    let n = 0;
    for (const b of blocks) {
      this.#blockStart.push(n);
      n += b.usedLength / TARGET_PAGE;
    }
    this.#totalPages = n;
    this.#sweep = new SweepOrder(blocks.length, (u) => this.#sent[u]!.length, () => CHUNK_PAGES);
    if (opts.prefetch?.length) this.#prefetch = new PrefetchOrder(opts.prefetch);
  }

  #openBlocks(): void {
    const pages = this.#open({
      arrived: (bi, first, count) => this.#onArrived(bi, first, count),
      fail: (e) => this.abort(e),
    });
    pages.zero.forEach((z, i) => {
      const b = this.#streamBlocks[i]!;
      if (z.pages * TARGET_PAGE !== b.usedLength) throw new MigrationError(`RAM block "${b.name}": the page source has ${z.pages * TARGET_PAGE} bytes, the stream ${b.usedLength}`);
    });
    this.#pages = pages;
    this.#mustSend = this.opts.sendZeroPages ? this.#totalPages : pages.zero.reduce((n, z) => n + z.pages - z.countZero(), 0);
  }

  get totalPages(): number {
    return this.#totalPages;
  }

  get sentPages(): number {
    return this.#sentPages;
  }

  /** Progress of the pages the stream must carry (data pages; all with sendZeroPages). */
  get progress(): { sent: number; of: number } {
    return { sent: this.#mustSent, of: this.#mustSend };
  }

  /** Milliseconds since run() started. */
  #now(): number {
    return performance.now() - this.#t0;
  }

  /**
   * Runs the whole migration: returns once the destination has sent SHUT 0 after our EOF.
   * `packageSent` is called as soon as the device state is on its way (the guest can run).
   */
  async run(addr: MigrationAddress, packageSent?: () => void): Promise<SinkStats> {
    this.#t0 = performance.now();
    const done = new Promise<void>((resolve, reject) => (this.#done = { resolve, reject }));
    done.catch(() => {});
    try {
      const main = await connectTo(addr);
      this.#main = main;
      this.#watch(main, "main");
      main.on("data", (d: Buffer) => this.#onReturnPath(d));
      main.on("drain", () => this.#pump());

      const head = new Bytes();
      head.bytes(this.opts.header);
      command(head, Cmd.OPEN_RETURN_PATH);
      ping(head, 1);
      this.#write(main, head);
      let pongTimer: ReturnType<typeof setTimeout> | undefined;
      try {
        await Promise.race([
          new Promise<void>((r) => (this.#pong1 = r)),
          done,
          new Promise<void>((_, rej) => {
            pongTimer = setTimeout(
              () => rej(new MigrationError(`the destination did not answer the first PING within ${PONG_TIMEOUT_MS} ms (is it a QEMU waiting on migrate-incoming?)`)),
              PONG_TIMEOUT_MS,
            );
          }),
        ]);
      } finally {
        clearTimeout(pongTimer);
      }

      const setup = new Bytes();
      advise(setup, this.opts.pageSizeSummary);
      ramStart(setup, this.opts.sectionId, this.#streamBlocks);
      // At least one DISCARD before LISTEN is mandatory (doc §7.1); one per block, as QEMU does.
      for (const b of this.#streamBlocks) discard(setup, b.name, 0, b.usedLength);
      this.#write(main, setup);

      if (this.opts.preempt) {
        // The destination waits for this channel before loading the device state (doc §4).
        const pre = await connectTo(addr, "preempt");
        this.#pre = pre;
        this.#watch(pre, "preempt");
      }
      const pkg = new Bytes(this.opts.deviceState.length + 64);
      packaged(pkg, this.opts.deviceState);
      this.#write(main, pkg);
      this.stats.packageSentMs = this.#now();
      packageSent?.();
      // No request can be read before this returns, so mapping the blocks now costs nothing the
      // guest waits for: QEMU is loading the device state meanwhile.
      this.#openBlocks();
      if (this.opts.backgroundAfter) {
        await Promise.race([this.opts.backgroundAfter.catch(() => {}), done]);
        this.#held = false;
      }
      this.#pump();
      await done;
      return this.stats;
    } finally {
      this.#finished = true;
      if (this.#rateTimer) clearTimeout(this.#rateTimer);
      this.#main?.destroy();
      this.#pre?.destroy();
    }
  }

  /** Ends the run with an error (e.g. the destination reported a failure over QMP). */
  abort(e: Error): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#done.reject(e);
  }

  #watch(s: Socket, name: string): void {
    s.on("error", (e: NodeJS.ErrnoException) => {
      this.abort(new MigrationError(`the destination's ${name} migration connection failed (${e.code ?? e.message}) before the restore completed: did QEMU exit? See its stderr`, {}, { cause: e }));
    });
    s.on("close", () => {
      // The destination closes the preempt channel when it has every page, possibly before
      // the SHUT on the main channel reaches us.
      if (name === "preempt" && this.#eofSent) return;
      this.abort(new MigrationError(`the destination closed the ${name} migration connection before the restore completed: did QEMU exit or fail? See its stderr`));
    });
  }

  #write(s: Socket, b: Bytes, done?: () => void): void {
    const buf = b.take();
    if (s === this.#pre) this.stats.bytesPreempt += buf.length;
    else this.stats.bytesMain += buf.length;
    s.write(buf, done);
  }

  #onReturnPath(d: Buffer): void {
    let msgs: RpMessage[];
    try {
      msgs = this.#rp.push(d);
    } catch (e) {
      return this.abort(new MigrationError(`bad return-path message from the destination: ${(e as RpError).message}`));
    }
    const at = performance.now();
    for (const m of msgs) {
      if (this.#finished) return;
      if (m.type === "pong") {
        if (m.value === 1) this.#pong1?.();
      } else if (m.type === "shut") {
        this.stats.shutMs = this.#now();
        if (m.value !== 0) return this.abort(new MigrationError(`the destination shut the migration down with an error (SHUT ${m.value}): see QEMU's stderr`));
        if (!this.#eofSent) return this.abort(new MigrationError("the destination ended the migration before every page was sent: see QEMU's stderr"));
        this.#finished = true;
        this.#done.resolve();
        return;
      } else if (m.type === "req") {
        this.#serveRequest(m.block, m.start, m.length, at);
      } else {
        this.opts.logger.debug("qemu.return_path_ignored", `return path: ignoring message type ${m.code}`, { type: m.code });
      }
    }
  }

  #serveRequest(name: string | undefined, start: number, length: number, receivedAt: number): void {
    // Requests can only follow LISTEN, which travels in the package, after which the blocks
    // are open; a destination that asks earlier is not following the protocol.
    const pages = this.#pages;
    if (pages === undefined) return this.abort(new MigrationError("the destination requested a page before the device state was sent"));
    const bi = name === undefined ? undefined : this.#byName.get(name);
    if (bi === undefined) return this.abort(new MigrationError(`the destination requested a page of unknown RAM block "${name}"`));
    const block = this.#streamBlocks[bi]!;
    if (start % TARGET_PAGE !== 0 || length <= 0 || length % TARGET_PAGE !== 0 || start + length > block.usedLength) {
      return this.abort(new MigrationError(`the destination requested a bad range ${start}+${length} of RAM block "${block.name}"`));
    }
    this.stats.requests++;
    // After EOF the main channel is closed for records: without preempt, a late request can
    // only be for a zero page nobody sent, which reads as zero once the destination finishes.
    if (this.#eofSent && !this.#pre) return;
    const first = start / TARGET_PAGE;
    const count = length / TARGET_PAGE;
    const end = first + count;
    for (let p = first; p < end; p++) this.opts.onRequest?.(bi, p);
    // Fault-around (the policy the uffd sink uses): the aligned window holding the request.
    const fa = this.opts.faultAround;
    const sent = this.#sent[bi]!;
    const winStart = windowStart(first, fa);
    const winEnd = windowEnd(winStart, end, fa, sent.length);
    const zero = pages.zero[bi]!;
    // Requested pages first; neighbours only when they hold data: a zero neighbour costs the
    // destination an ioctl for a page the guest may never touch.
    const now: number[] = [];
    let missLo = -1;
    let missHi = -1;
    let waits = 0;
    const take = (p: number, requested: boolean) => {
      if (sent[p]) return;
      if (zero.isZero(p) || pages.bytes(bi, p) !== undefined) return void now.push(p);
      // Not here yet (remote source): sent when it arrives, on the preempt channel.
      const key = this.#key(bi, p);
      if (requested) {
        waits++;
        this.#waiting.set(key, receivedAt);
      } else if (!this.#waiting.has(key)) this.#waiting.set(key, -1);
      if (this.#fetching[bi]![p] !== 2) {
        missLo = missLo < 0 ? p : Math.min(missLo, p);
        missHi = Math.max(missHi, p + 1);
      }
    };
    for (let p = first; p < end; p++) take(p, true);
    for (let p = winStart; p < winEnd; p++) if ((p < first || p >= end) && !zero.isZero(p)) take(p, false);
    const requestedUnsent = this.#countUnsent(bi, first, count);
    if (requestedUnsent === 0) {
      // Already sent in the background; the destination gets it from the main channel.
      this.stats.requestsInFlight++;
    }
    if (missLo >= 0) this.#fetch(bi, missLo, missHi, true);
    const n = this.#sendNow(bi, now);
    this.stats.pagesOnRequest += n;
    if (requestedUnsent > 0 && waits === 0) this.stats.latenciesMs.push(performance.now() - receivedAt);
    this.#sweep.follow(bi, winEnd);
    this.#sweepBusy = false; // the rest of the current span waits for the next pass
    this.#passWhole = false;
    this.#maybeFinish();
  }

  #key(bi: number, page: number): number {
    return this.#blockStart[bi]! + page;
  }

  /** Asks a remote source for the data pages of [from, to) of block bi not asked for yet (urgently: again). */
  #fetch(bi: number, from: number, to: number, urgent: boolean): void {
    const f = this.#fetching[bi]!;
    const mark = urgent ? 2 : 1;
    for (let p = from; p < to; p++) {
      if (f[p] === 0 && !urgent) this.#fetchingBackground++;
      if (f[p]! < mark) f[p] = mark;
    }
    this.#pages!.fetch!(bi, from, to - from, urgent);
  }

  /** A remote source delivered pages: requested ones go out now, the rest join the background. */
  #onArrived(bi: number, first: number, count: number): void {
    if (this.#finished) return;
    const sent = this.#sent[bi]!;
    const f = this.#fetching[bi]!;
    const now: number[] = [];
    const at = performance.now();
    let latencyFrom = Infinity;
    for (let p = first; p < first + count; p++) {
      if (f[p] === 1) this.#fetchingBackground--;
      f[p] = 0;
      if (sent[p]) {
        this.#pages!.sent?.(bi, p); // a second copy (asked again urgently): not kept
        continue;
      }
      if (this.#pages!.bytes(bi, p) === undefined) continue;
      const key = this.#key(bi, p);
      const waited = this.#waiting.get(key);
      if (waited !== undefined) {
        this.#waiting.delete(key);
        if (waited >= 0) latencyFrom = Math.min(latencyFrom, waited);
        now.push(p);
      } else this.#arrived.push(key);
    }
    if (now.length) {
      this.stats.pagesOnRequest += this.#sendNow(bi, now);
      if (latencyFrom !== Infinity) this.stats.latenciesMs.push(at - latencyFrom);
    }
    this.#pump();
  }

  #countUnsent(bi: number, first: number, count: number): number {
    let n = 0;
    for (let p = first; p < first + count; p++) if (!this.#sent[bi]![p]) n++;
    return n;
  }

  /** Sends the unsent pages among `pages` (one block, all present) right away; returns how many were sent. */
  #sendNow(bi: number, pages: number[]): number {
    const sent = this.#sent[bi]!;
    const todo = pages.filter((p) => !sent[p]);
    if (todo.length === 0) return 0;
    const b = new Bytes(todo.length * (TARGET_PAGE + 16) + 300);
    if (this.#pre) {
      // The preempt channel carries raw records; its block name persists across our writes.
      for (const p of todo) {
        this.#record(b, bi, p, this.#preLastBlock !== bi);
        this.#preLastBlock = bi;
      }
      this.#write(this.#pre, b);
    } else {
      partHeader(b, this.opts.sectionId);
      todo.forEach((p, i) => this.#record(b, bi, p, i === 0));
      sectionTail(b, this.opts.sectionId);
      this.#write(this.#main!, b);
    }
    return todo.length;
  }

  /** Appends one page record and marks the page sent (the only place that does). */
  #record(b: Bytes, bi: number, page: number, withName: boolean): void {
    const block = this.#streamBlocks[bi]!;
    const sent = this.#sent[bi]!;
    const pages = this.#pages!;
    if (sent[page]) throw new MigrationError(`internal error: page ${page} of ${block.name} about to be sent twice (the destination would fail)`);
    const zero = pages.zero[bi]!.isZero(page);
    const data = zero ? undefined : pages.bytes(bi, page);
    // Callers send only pages whose bytes are here (a local mapping holds every data page).
    if (!zero && data === undefined) throw new MigrationError(`internal error: data page ${page} of ${block.name} sent before its bytes arrived`);
    sent[page] = 1;
    this.#sentPages++;
    if (!zero || this.opts.sendZeroPages) this.#mustSent++;
    pageRecord(b, page * TARGET_PAGE, withName ? block.name : undefined, data);
    if (!zero) pages.sent?.(bi, page);
  }

  /** Whether the background still has to send this page. */
  #wanted(bi: number, page: number): boolean {
    return !this.#sent[bi]![page] && (this.opts.sendZeroPages === true || !this.#pages!.zero[bi]!.isZero(page));
  }

  /** Whole-snapshot page -> block index and page (for the prefetch list). */
  #locate(g: number): number {
    let bi = this.#blockStart.length - 1;
    while (bi > 0 && this.#blockStart[bi]! > g) bi--;
    return bi;
  }

  /**
   * The next page for the background, present and unsent, as a whole-snapshot page number; -1
   * when none is ready now. Order: pages a remote source just delivered, the working set
   * (PrefetchOrder), then the sweep (SweepOrder, following the guest's requests). Pages not here
   * yet are fetched on the way and come back through the first queue.
   */
  #nextBackground(): { key: number; prefetch: boolean } | undefined {
    const pages = this.#pages!;
    while (this.#arrivedAt < this.#arrived.length) {
      const key = this.#arrived[this.#arrivedAt++]!;
      const bi = this.#locate(key);
      if (!this.#sent[bi]![key - this.#blockStart[bi]!]) return { key, prefetch: false };
    }
    if (this.#arrivedAt > 0) {
      this.#arrived = [];
      this.#arrivedAt = 0;
    }
    const pf = this.#prefetch;
    while (pf !== undefined && (this.#prefetchAt < this.#prefetchStep.length || !pf.done)) {
      if (this.#prefetchAt >= this.#prefetchStep.length) {
        this.#prefetchStep = pf.step();
        this.#prefetchAt = 0;
      }
      const g = this.#prefetchStep[this.#prefetchAt++]!;
      if (g >= this.#totalPages) continue;
      const bi = this.#locate(g);
      const p = g - this.#blockStart[bi]!;
      if (this.#sent[bi]![p]) continue;
      if (pages.zero[bi]!.isZero(p) || pages.bytes(bi, p) !== undefined) return { key: g, prefetch: true };
      if (this.#fetching[bi]![p] === 0) this.#fetch(bi, p, p + 1, false);
    }
    const sweep = this.#sweep;
    for (;;) {
      if (!this.#sweepBusy) {
        if (this.#sweepIdle) return undefined;
        if (pages.fetch !== undefined && this.#fetchingBackground >= FETCH_WINDOW_PAGES) return undefined;
        if (!sweep.next()) {
          // End of a pass: another while the last one moved something, or did not cover every
          // page (the sweep jumped after a request: the pages it jumped over).
          if (!this.#passProgress && this.#passWhole) this.#sweepIdle = true;
          this.#passProgress = false;
          this.#passWhole = true;
          continue;
        }
        this.#sweepBusy = true;
        if (pages.fetch !== undefined) this.#fetchSpan(sweep.unit, sweep.from, sweep.to);
      }
      const bi = sweep.unit;
      const zero = pages.zero[bi]!;
      while (sweep.from < sweep.to) {
        // Skip runs of zero pages a word at a time.
        if (!this.opts.sendZeroPages) sweep.from = zero.nextData(sweep.from, sweep.to);
        if (sweep.from >= sweep.to) break;
        const p = sweep.from++;
        if (!this.#sent[bi]![p] && pages.bytes(bi, p) !== undefined) {
          this.#passProgress = true;
          return { key: this.#blockStart[bi]! + p, prefetch: false };
        }
      }
      this.#sweepBusy = false;
    }
  }

  /** Fetches the wanted data pages of a sweep span that are neither here nor asked for. */
  #fetchSpan(bi: number, from: number, to: number): void {
    const pages = this.#pages!;
    const f = this.#fetching[bi]!;
    let lo = -1;
    for (let p = from; p <= to; p++) {
      const want = p < to && f[p] === 0 && this.#wanted(bi, p) && !pages.zero[bi]!.isZero(p) && pages.bytes(bi, p) === undefined;
      if (want && lo < 0) lo = p;
      else if (!want && lo >= 0) {
        this.#fetch(bi, lo, p, false);
        this.#passProgress = true;
        lo = -1;
      }
    }
  }

  /** Streams background pages while our socket buffer has room; ends the stream when all are sent. */
  #pump(): void {
    const main = this.#main;
    if (!main || this.#finished || this.#eofSent || this.#pages === undefined || this.#held) return;
    while (main.writableLength < HIGH_WATER && this.#mustSent < this.#mustSend && this.#pool.length > 0) {
      if (this.#rateLimited()) return;
      let next = this.#nextBackground();
      if (next === undefined) break;
      const chunk = this.#pool.pop()!;
      const b = new Bytes(CHUNK_BYTES, chunk);
      partHeader(b, this.opts.sectionId);
      let last = -1;
      for (let n = 0; n < CHUNK_PAGES && next !== undefined; n++) {
        const bi = this.#locate(next.key);
        this.#record(b, bi, next.key - this.#blockStart[bi]!, bi !== last);
        last = bi;
        if (next.prefetch) this.stats.pagesPrefetched++;
        else this.stats.pagesBackground++;
        if (n + 1 < CHUNK_PAGES) next = this.#nextBackground();
      }
      sectionTail(b, this.opts.sectionId);
      this.#rateBytes += b.len;
      // Back to the pool once the socket is done with it; then the stream can go on.
      this.#write(main, b, () => {
        this.#pool.push(chunk);
        this.#pump();
      });
    }
    this.#maybeFinish();
  }

  /** True (and a resume scheduled) when the background is ahead of --background-rate. */
  #rateLimited(): boolean {
    const rate = this.opts.backgroundRate;
    if (rate === undefined) return false;
    const now = performance.now();
    if (this.#rateStart === 0) this.#rateStart = now;
    const aheadMs = (this.#rateBytes / rate) * 1000 - (now - this.#rateStart);
    if (aheadMs <= 0) return false;
    this.#rateTimer ??= setTimeout(() => {
      this.#rateTimer = undefined;
      this.#pump();
    }, aheadMs);
    return true;
  }

  #maybeFinish(): void {
    if (this.#eofSent || this.#finished || this.#mustSent < this.#mustSend) return;
    const b = new Bytes(64);
    endHeader(b, this.opts.sectionId);
    sectionTail(b, this.opts.sectionId);
    eof(b);
    this.#write(this.#main!, b);
    this.#eofSent = true;
    this.stats.eofSentMs = this.#now();
  }
}

export function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}
