// The QEMU page sink: plays the postcopy migration SOURCE for an unmodified QEMU destination.
// Sends the minimal order of docs/qemu-postcopy-source.md §3.2, then answers the guest's
// page requests first (on the preempt channel when there is one) while every other page streams
// in the background, each page exactly once across all channels (§4: a second copy is fatal).
import { connect, type Socket } from "node:net";
import { toArrayBuffer, type Pointer } from "bun:ffi";
import { SnaploadError } from "../../core/errors.ts";
import type { ImageBackend } from "../../sources/port.ts";
import type { Logger } from "../../core/log.ts";
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

export interface SinkBlock extends StreamBlock {
  /** Where the page bytes come from: a page source's backend (its zero map and mapping). */
  backend: ImageBackend;
}

/** The blocks, opened only once the device state is on its way (QEMU loads it meanwhile). */
export type OpenBlocks = () => ImageBackend[];

export interface SinkOptions {
  sectionId: number;
  header: Uint8Array;
  deviceState: Uint8Array;
  pageSizeSummary: number;
  preempt: boolean;
  /** Neighbouring 4 KiB pages sent with each request (aligned window; 1 = the page alone). */
  faultAround: number;
  logger: Logger;
  /** Pages to send first, in order, right after the device state (a recorded working set). */
  prefetch?: { block: number; page: number }[];
  /**
   * Send ZERO records for zero pages in the background too, as QEMU's own source does. By default
   * they are sent only when requested: pages never sent read as zero once the destination
   * unregisters its RAM at the end (doc §4, option b), which saves it one ioctl per zero page.
   */
  sendZeroPages?: boolean;
  /** Caps the background stream (bytes/s), like QEMU's max-postcopy-bandwidth; requests are not capped. */
  backgroundRate?: number;
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
const HINT_WINDOW = 256; // pages the background follows after a request before the linear sweep
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
  #blocks: SinkBlock[] = [];
  readonly #streamBlocks: StreamBlock[];
  readonly #open: OpenBlocks;
  readonly #byName: Map<string, number>;
  readonly #sent: Uint8Array[];
  #views: (Uint8Array | undefined)[] = [];
  readonly #totalPages: number;
  /** Pages the stream must carry before it can end: data pages (plus zero pages with sendZeroPages). */
  #mustSend = 0;
  #sentPages = 0;
  #mustSent = 0;
  #main: Socket | undefined;
  #pre: Socket | undefined;
  #preLastBlock = -1;
  #cursorBlock = 0;
  #cursorPage = 0;
  #hint: { block: number; page: number; left: number } | undefined;
  #prefetch: { block: number; page: number }[] = [];
  #prefetchAt = 0;
  #eofSent = false;
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
    this.#byName = new Map(blocks.map((b, i) => [b.name, i]));
    this.#sent = blocks.map((b) => new Uint8Array(b.usedLength / TARGET_PAGE));
    this.#totalPages = blocks.reduce((n, b) => n + b.usedLength / TARGET_PAGE, 0);
    if (opts.prefetch) this.#prefetch = opts.prefetch;
  }

  #openBlocks(): void {
    const backends = this.#open();
    this.#blocks = this.#streamBlocks.map((b, i) => {
      const backend = backends[i]!;
      if (backend.size !== b.usedLength) throw new MigrationError(`RAM block "${b.name}": the page source has ${backend.size} bytes, the stream ${b.usedLength}`);
      return { ...b, backend };
    });
    const blocks = this.#blocks;
    this.#mustSend = this.opts.sendZeroPages ? this.#totalPages : blocks.reduce((n, b) => n + b.backend.zero.pages - b.backend.zero.countZero(), 0);
    // One view over each block's mapping; only pages the zero map calls data are ever read.
    this.#views = blocks.map((b) => (b.backend.base === 0 ? undefined : new Uint8Array(toArrayBuffer(b.backend.base as Pointer, 0, b.usedLength))));
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
    if (this.#blocks.length === 0) return this.abort(new MigrationError("the destination requested a page before the device state was sent"));
    const bi = name === undefined ? undefined : this.#byName.get(name);
    if (bi === undefined) return this.abort(new MigrationError(`the destination requested a page of unknown RAM block "${name}"`));
    const block = this.#blocks[bi]!;
    if (start % TARGET_PAGE !== 0 || length <= 0 || length % TARGET_PAGE !== 0 || start + length > block.usedLength) {
      return this.abort(new MigrationError(`the destination requested a bad range ${start}+${length} of RAM block "${block.name}"`));
    }
    this.stats.requests++;
    // After EOF the main channel is closed for records: without preempt, a late request can
    // only be for a zero page nobody sent, which reads as zero once the destination finishes.
    if (this.#eofSent && !this.#pre) return;
    const first = start / TARGET_PAGE;
    const count = length / TARGET_PAGE;
    for (let p = first; p < first + count; p++) this.opts.onRequest?.(bi, p);
    // Fault-around: the aligned window holding the request, requested pages first.
    const fa = this.opts.faultAround;
    const winStart = Math.floor(first / fa) * fa;
    const winEnd = Math.min(this.#sent[bi]!.length, Math.max(first + count, winStart + fa));
    const pages: number[] = [];
    for (let p = first; p < first + count; p++) pages.push(p);
    // Neighbours only when they hold data: a zero neighbour costs the destination an ioctl for
    // a page the guest may never touch.
    const zero = block.backend.zero;
    for (let p = winStart; p < winEnd; p++) if ((p < first || p >= first + count) && !zero.isZero(p)) pages.push(p);
    const requestedUnsent = this.#countUnsent(bi, first, count);
    if (requestedUnsent === 0) {
      // Already sent in the background; the destination gets it from the main channel.
      this.stats.requestsInFlight++;
    }
    const n = this.#sendNow(bi, pages);
    this.stats.pagesOnRequest += n;
    if (requestedUnsent > 0) this.stats.latenciesMs.push(performance.now() - receivedAt);
    this.#hint = { block: bi, page: winEnd, left: HINT_WINDOW };
    this.#maybeFinish();
  }

  #countUnsent(bi: number, first: number, count: number): number {
    let n = 0;
    for (let p = first; p < first + count; p++) if (!this.#sent[bi]![p]) n++;
    return n;
  }

  /** Sends the unsent pages among `pages` (one block) right away; returns how many were sent. */
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
    const block = this.#blocks[bi]!;
    const sent = this.#sent[bi]!;
    if (sent[page]) throw new MigrationError(`internal error: page ${page} of ${block.name} about to be sent twice (the destination would fail)`);
    sent[page] = 1;
    this.#sentPages++;
    const zero = block.backend.zero.isZero(page);
    if (!zero || this.opts.sendZeroPages) this.#mustSent++;
    const view = this.#views[bi];
    // The parser checked that every data page lies inside the file, hence inside the mapping.
    if (!zero && !view) throw new MigrationError(`internal error: data page ${page} of ${block.name} has no mapping`);
    const data = zero ? undefined : view!.subarray(page * TARGET_PAGE, (page + 1) * TARGET_PAGE);
    pageRecord(b, page * TARGET_PAGE, withName ? block.name : undefined, data);
  }

  /** Whether the background still has to send this page. */
  #wanted(bi: number, page: number): boolean {
    return !this.#sent[bi]![page] && (this.opts.sendZeroPages === true || !this.#blocks[bi]!.backend.zero.isZero(page));
  }

  /** The next unsent page for the background: prefetch list, then after recent requests, then in order. */
  #nextBackground(): { block: number; page: number; prefetch: boolean } | undefined {
    while (this.#prefetchAt < this.#prefetch.length) {
      const p = this.#prefetch[this.#prefetchAt++]!;
      if (!this.#sent[p.block]![p.page]) return { ...p, prefetch: true };
    }
    const h = this.#hint;
    if (h) {
      const sent = this.#sent[h.block]!;
      while (h.left > 0 && h.page < sent.length) {
        h.left--;
        const p = h.page++;
        if (this.#wanted(h.block, p)) return { block: h.block, page: p, prefetch: false };
      }
      this.#hint = undefined;
    }
    while (this.#cursorBlock < this.#blocks.length) {
      const sent = this.#sent[this.#cursorBlock]!;
      const zero = this.#blocks[this.#cursorBlock]!.backend.zero;
      while (this.#cursorPage < sent.length) {
        // Skip runs of zero pages a word at a time.
        if (!this.opts.sendZeroPages) this.#cursorPage = zero.nextData(this.#cursorPage);
        if (this.#cursorPage >= sent.length) break;
        const p = this.#cursorPage++;
        if (!sent[p]) return { block: this.#cursorBlock, page: p, prefetch: false };
      }
      this.#cursorBlock++;
      this.#cursorPage = 0;
    }
    return undefined;
  }

  /** Streams background pages while our socket buffer has room; ends the stream when all are sent. */
  #pump(): void {
    const main = this.#main;
    if (!main || this.#finished || this.#eofSent) return;
    while (main.writableLength < HIGH_WATER && this.#mustSent < this.#mustSend && this.#pool.length > 0) {
      if (this.#rateLimited()) return;
      const chunk = this.#pool.pop()!;
      const b = new Bytes(CHUNK_BYTES, chunk);
      partHeader(b, this.opts.sectionId);
      let last = -1;
      for (let n = 0; n < CHUNK_PAGES; n++) {
        const next = this.#nextBackground();
        if (!next) break;
        this.#record(b, next.block, next.page, next.block !== last);
        last = next.block;
        if (next.prefetch) this.stats.pagesPrefetched++;
        else this.stats.pagesBackground++;
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
