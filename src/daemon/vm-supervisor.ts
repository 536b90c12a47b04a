// The owner of one connected VM: its session (uffd, page table, fault path), the source's
// requester, the populator, the recorder, its event-loop registrations and timers, and its fds.
// Every event that may change the VM's course ends in `decide()`, the one place that chooses
// between retry, detach, fail and carrying on; `close()` releases everything the VM holds.
import type { ErrorCode } from "../core/errors.ts";
import type { EventLoop } from "../core/event-loop.ts";
import { EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLRDHUP, Errno, errnoName, sl } from "../core/ffi.ts";
import { type Fields, formatBytes, type Logger } from "../core/log.ts";
import type { VmTotals } from "../metrics/serve-metrics.ts";
import { HandlerTable } from "../scheduler/handler-table.ts";
import { Populator, type PopulateMode } from "../scheduler/populator.ts";
import { TouchRecorder, writeWorkingSet } from "../scheduler/working-set.ts";
import type { RegionMapping } from "../sinks/uffd/handshake.ts";
import type { UffdKernel } from "../sinks/uffd/kernel.ts";
import type { PageRequester, PageSource, RequesterContext } from "../sources/port.ts";
import { type Scratch, type VmFailure, VmSession, type VmStats } from "./vm-session.ts";

/** How a VM's service ended. */
export type VmEnd =
  /** Its VMM closed the connection (a served VM). */
  | { readonly kind: "hung-up" }
  /** snapload shut down while it was connected. */
  | { readonly kind: "shutdown" }
  /** It could no longer be served: killed or dropped (`--on-fatal`). */
  | VmFailure;

export interface VmExit {
  id: number;
  pid: number;
  /** One line: "VMM hung up", "snapload shut down", "failed: <detail>". */
  reason: string;
  end: VmEnd;
  stats: VmStats;
  seconds: number;
}

/** What a supervisor needs of the daemon: shared for every VM of one server. */
export interface SupervisorDeps {
  loop: EventLoop;
  logger: Logger;
  totals: VmTotals;
  scratch: Scratch;
  faultAround: number;
  populate: PopulateMode;
  /** What to do with a VM that can no longer be served: Firecracker's docs advise SIGKILL. */
  onFatal: "kill" | "drop";
  /** Where to write the VM's first-touch order; `{vm}` and `{pid}` are substituted. */
  recordPath?: string;
  /** The userfaultfd calls of the fault path (default: the C core). */
  kernel?: UffdKernel;
  /** Told once, after the VM released everything. */
  closed(vm: VmSupervisor, exit: VmExit): void;
}

/** An accepted connection: everything it brought is the supervisor's to close from now on. */
export interface VmConnection {
  id: number;
  pid: number;
  /** The connecting process, pinned at accept (-errno if unavailable): a reused pid is never signalled. */
  pidfd: number;
  uffd: number;
  sock: number;
  regions: RegionMapping[];
  source: PageSource;
  socketPath: string;
  /** Pages to install as soon as the VM connects, in this order (image pages). */
  prefetch?: Uint32Array;
}

const SIGKILL = 9;
/**
 * Messages one drain reads while other VMs' faults wait in the same turn (each may install a
 * fault-around window): a VM with many vCPUs faulting does not hold the others for a full drain.
 */
const CONTENDED_MSGS = 8;
/** How soon faults that met EAGAIN (an event pending in the kernel) are retried. */
const RETRY_MS = 1;

export class VmSupervisor {
  readonly id: number;
  readonly pid: number;
  readonly session: VmSession;
  readonly connectedAt = performance.now();
  private state: "serving" | "detached" | "closed" = "serving";
  /** Inside the fault path or a populator step: decisions wait until it returns. */
  private busy = false;
  private uffdToken = -1;
  private sockToken = -1;
  private pidfd: number;
  private readonly recorder: TouchRecorder | undefined;
  private requester: PageRequester | undefined;
  private populator: Populator | undefined;
  private backgroundOn = false;
  private readonly background = () => this.populateStep();
  private cancelRetry: (() => void) | undefined;

  constructor(
    private readonly deps: SupervisorDeps,
    private readonly conn: VmConnection,
  ) {
    this.id = conn.id;
    this.pid = conn.pid;
    this.pidfd = conn.pidfd;
    const backend = conn.source.backend;
    const table = new HandlerTable(conn.regions, backend);
    this.recorder = deps.recordPath !== undefined ? new TouchRecorder(Math.ceil(backend.size / 4096)) : undefined;
    this.session = new VmSession(conn.id, conn.uffd, table, deps.scratch, { faultAround: deps.faultAround, recorder: this.recorder, kernel: deps.kernel });
  }

  get detached(): boolean {
    return this.state === "detached";
  }

  get closed(): boolean {
    return this.state === "closed";
  }

  /** Opens the source's requester, watches the fds, starts population, and serves what is queued. Throws if setup fails (then close() it). */
  start(): void {
    const { loop, logger } = this.deps;
    const conn = this.conn;
    const source = conn.source;
    if (source.kind === "remote") {
      const ctx: RequesterContext = {
        loop,
        logger,
        fail: (code: ErrorCode, detail: string, context?: Fields) => {
          this.session.fail(code, detail, undefined, context);
          this.decide();
        },
        delivered: () => this.decide(),
      };
      this.requester = source.openRequester(this.session, ctx);
      this.session.setRequester(this.requester);
    }
    this.deps.totals.connected++;
    this.uffdToken = loop.add(conn.uffd, EPOLLIN, () => this.serve(), true);
    this.sockToken = loop.add(conn.sock, EPOLLRDHUP, (ev) => {
      if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) this.close({ kind: "hung-up" });
    });
    const regions = conn.regions;
    const table = this.session.table;
    const pageSizes = [...new Set(regions.map((r) => r.pageSize))];
    logger.info(
      "vm.connected",
      `vm ${this.id} pid ${this.pid} connected: ${regions.length} region${regions.length > 1 ? "s" : ""}, ${formatBytes(table.bytes)}, ${pageSizes.map((p) => formatBytes(p)).join("/")} pages`,
      { vm: this.id, pid: this.pid, socket: conn.socketPath, regions: regions.length, bytes: table.bytes, pageSizes },
    );
    // A remote source's requester does its own background completion (it knows what is in flight).
    const populator = new Populator(this.session, conn.prefetch, source.kind === "remote" ? "none" : this.deps.populate);
    if (!populator.idle) {
      this.populator = populator;
      this.backgroundOn = true;
      loop.addBackground(this.background);
    }
    // The VMM may have faulted already, before we watched the uffd.
    this.serve();
  }

  /**
   * The uffd is readable (or a retry is due): serve it. Returns the pages installed (+ 1 for the
   * read): the loop serves the VM that did the least of them lately first.
   */
  private serve(): number {
    if (this.state === "closed") return 1;
    const stats = this.session.stats;
    const before = stats.pagesInstalled;
    this.busy = true;
    // A detached VM may still have a REMOVE queued from before the unregister; its madvise
    // waits until someone reads it, so keep reading (and ignoring) until the VMM hangs up.
    if (this.state === "detached") this.session.discardMessages();
    // Other VMs' faults are waiting in this turn: a short drain, the rest after them.
    else if (this.deps.loop.contended) this.session.drain(CONTENDED_MSGS, 1);
    else this.session.drain();
    this.busy = false;
    this.decide();
    return stats.pagesInstalled - before + 1;
  }

  /** One slice of prefetch/population; the loop runs it when no fd is ready. */
  private populateStep(): boolean {
    const populator = this.populator;
    if (populator === undefined || this.state !== "serving") {
      this.stopBackground();
      return false;
    }
    this.busy = true;
    const more = populator.step();
    this.busy = false;
    if (!more) {
      this.populator = undefined;
      this.stopBackground();
    }
    this.decide();
    return more;
  }

  /**
   * The one place that decides what happens to the VM next, after anything that may change its
   * course (a drain, a retry, a delivery, a populator step, a requester's failure): fail it if
   * something reported a failure, retry faults that met EAGAIN, detach it once every page is in
   * place. Waits while the fault path or a populator step is running (called again after).
   */
  private decide(): void {
    if (this.busy || this.state === "closed") return;
    const session = this.session;
    const failure = session.failure;
    if (failure !== undefined) return this.fail(failure);
    if (this.state === "detached") return;
    if (session.retry.length > 0) return this.scheduleRetry();
    if (session.table.complete) this.detach();
  }

  /** Faults that met EAGAIN are retried after a tick, one timer however often the VM wakes. */
  private scheduleRetry(): void {
    if (this.cancelRetry !== undefined) return;
    this.cancelRetry = this.deps.loop.after(RETRY_MS, () => {
      this.cancelRetry = undefined;
      this.serve();
    });
  }

  /** Every page is settled: unregister so the VM no longer depends on us (or on the network). */
  private detach(): void {
    const session = this.session;
    if (!session.detach()) {
      if (session.failure !== undefined) this.fail(session.failure);
      return;
    }
    this.state = "detached";
    this.populator = undefined;
    this.stopBackground();
    // Nothing more is needed from the source.
    this.requester?.close();
    this.busy = true;
    session.discardMessages();
    this.busy = false;
    if (session.failure !== undefined) return this.fail(session.failure);
    this.deps.totals.detached++;
    const s = session.stats;
    const seconds = (performance.now() - this.connectedAt) / 1000;
    this.deps.logger.info(
      "vm.detached",
      `vm ${this.id} pid ${this.pid} fully populated in ${seconds.toFixed(3)} s (${s.faults} faults, ${s.prefetchedPages} prefetched, ${s.populatedPages} populated pages); detached`,
      { vm: this.id, pid: this.pid, seconds, faults: s.faults, prefetchedPages: s.prefetchedPages, populatedPages: s.populatedPages },
    );
  }

  /** The VM cannot be served any more: kill its VMM (or drop it), then close. */
  private fail(f: VmFailure): void {
    const logger = this.deps.logger;
    // The error's context first: the fixed fields win a clash.
    const fields = { ...f.context, vm: this.id, pid: this.pid, reason: f.detail, code: f.code, ...(f.errno !== undefined ? { errno: errnoName(f.errno) } : {}) };
    const what = `vm ${this.id} pid ${this.pid}: ${f.detail}`;
    if (this.deps.onFatal === "kill") {
      // A vCPU blocked in a KVM fault ignores gentler signals (Firecracker's advice). Through the
      // pidfd taken at accept: the pid alone may have been reused by an unrelated process.
      const r = this.pidfd >= 0 ? sl.sl_pidfd_send_signal(this.pidfd, SIGKILL) : this.pidfd;
      if (r === 0) logger.error("vm.failed", `${what}; killed the VMM`, { ...fields, action: "killed" });
      else if (r === -Errno.ESRCH) {
        logger.error("vm.failed", `${what}; the process that connected has exited (not killing pid ${this.pid}, which may be reused); dropped`, { ...fields, action: "dropped", signalErrno: "ESRCH" });
      } else logger.error("vm.failed", `${what}; cannot signal the VMM (${errnoName(-r)}); dropped`, { ...fields, action: "dropped", signalErrno: errnoName(-r) });
    } else {
      logger.error("vm.failed", `${what}; dropped`, { ...fields, action: "dropped" });
    }
    this.close(f);
  }

  /** Releases everything the VM holds (fds, registrations, timers, requester) and reports its exit. Idempotent. */
  close(end: VmEnd): void {
    if (this.state === "closed") return;
    this.state = "closed";
    const { loop, logger, totals } = this.deps;
    const conn = this.conn;
    if (this.uffdToken >= 0) loop.remove(this.uffdToken, conn.uffd);
    if (this.sockToken >= 0) loop.remove(this.sockToken, conn.sock);
    this.cancelRetry?.();
    this.cancelRetry = undefined;
    this.populator = undefined;
    this.stopBackground();
    this.requester?.close();
    this.requester = undefined;
    // The socket last: a VMM that sees the hang-up finds none of this VM's fds still open here.
    sl.sl_close(conn.uffd);
    if (this.pidfd >= 0) sl.sl_close(this.pidfd);
    this.pidfd = -1;
    sl.sl_close(conn.sock);
    this.writeRecording();
    const session = this.session;
    totals.retire(session);
    // A failure was logged by fail() (or as vm.setup_failed) already.
    if (end.kind === "failed") totals.failed++;
    else totals.served++;
    const reason = end.kind === "failed" ? `failed: ${end.detail}` : end.kind === "shutdown" ? "snapload shut down" : "VMM hung up";
    const seconds = (performance.now() - this.connectedAt) / 1000;
    const s = session.stats;
    const exit: VmExit = { id: this.id, pid: this.pid, reason, end, stats: { ...s }, seconds };
    if (end.kind !== "failed") {
      logger.info(
        "vm.exited",
        `vm ${this.id} pid ${this.pid} exited (${reason}): ${s.pagesInstalled} pages served (${s.zeroPagesInstalled} zero) in ${s.faults} faults over ${seconds.toFixed(2)} s`,
        { vm: this.id, pid: this.pid, reason, pages: s.pagesInstalled, zeroPages: s.zeroPagesInstalled, faults: s.faults, seconds },
      );
    }
    this.deps.closed(this, exit);
  }

  /** Writes the VM's first-touch order (at exit, and on SIGUSR1). */
  writeRecording(): void {
    const rec = this.recorder;
    const pattern = this.deps.recordPath;
    if (rec === undefined || pattern === undefined) return;
    const path = pattern.replaceAll("{vm}", String(this.id)).replaceAll("{pid}", String(this.pid));
    const logger = this.deps.logger;
    try {
      writeWorkingSet(path, rec.order, this.conn.source.backend.size);
      logger.info("vm.recorded", `vm ${this.id} pid ${this.pid}: recorded ${rec.length} first touches to ${path}`, { vm: this.id, pid: this.pid, pages: rec.length, path });
    } catch (e) {
      logger.error("vm.record_failed", `vm ${this.id}: writing the working set to ${path} failed: ${(e as Error).message}`, {
        vm: this.id, pid: this.pid, path, error: (e as Error).message, code: (e as { code?: string }).code,
      });
    }
  }

  private stopBackground(): void {
    if (!this.backgroundOn) return;
    this.backgroundOn = false;
    this.deps.loop.removeBackground(this.background);
  }
}
