// `snapload serve`: the Unix socket VMMs hand their userfaultfd to, and every VM's lifecycle.
// A bad peer costs one log line and its own connection; every other VM keeps being served.
import { check } from "../core/check.ts";
import { HandshakeError, SnaploadError, SocketInUseError } from "../core/errors.ts";
import { EventLoop } from "../core/event-loop.ts";
import { cstr, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLRDHUP, Errno, errnoName, NativeBuffer, sl } from "../core/ffi.ts";
import { checkRegionsFitImage, JsonScanner, type RegionMapping, MAX_HANDSHAKE_BYTES, MAX_HANDSHAKE_MESSAGES, parseHandshake } from "../sinks/uffd/handshake.ts";
import { HandlerTable, type PageBackend, type PageRequester } from "../scheduler/handler-table.ts";
import { formatBytes, type Logger } from "../core/log.ts";
import { VmTotals } from "../metrics/serve-metrics.ts";
import { Populator, type PopulateMode } from "../scheduler/populator.ts";
import { Scratch, VmSession, type VmStats } from "./vm-session.ts";
import { TouchRecorder, writeWorkingSet } from "../scheduler/working-set.ts";

/** What a remote source's per-VM requester may use of the daemon. */
export interface RequesterContext {
  loop: EventLoop;
  logger: Logger;
  /** The VM cannot be served any more (e.g. no page server within the deadline): kill or drop it. */
  fail(reason: string): void;
  /** Call after vm.deliver(): serves retries, detaches a VM whose pages are all installed. */
  delivered(): void;
}

/** Where a listener's pages come from: a local image, or a remote page server (one requester per VM). */
export interface PageSource {
  readonly backend: PageBackend;
  /** Remote sources only: the per-VM channel that fetches pages and delivers them to the VM. */
  openRequester?(vm: VmSession, ctx: RequesterContext): PageRequester & { close(): void };
}

/** One Unix socket VMMs connect to, and the source its VMs are restored from. */
export interface Listener {
  socketPath: string;
  socketMode: number;
  source: PageSource;
  /** Pages to install as soon as a VM connects, in this order (image pages). */
  prefetch?: Uint32Array;
}

export interface ServerOptions {
  listeners: Listener[];
  faultAround: number;
  /** A peer that has not completed its handshake by then is dropped. */
  handshakeTimeoutMs: number;
  /** What to do with a VM that can no longer be served: Firecracker's docs advise SIGKILL. */
  onFatal: "kill" | "drop";
  populate: PopulateMode;
  /** Where to write each VM's first-touch order; `{vm}` and `{pid}` are substituted. */
  recordPath?: string;
  logger: Logger;
}

export interface VmExit {
  id: number;
  pid: number;
  reason: string;
  stats: VmStats;
  seconds: number;
}

/** Known VMMs send the uffd and at most two more fds (e2b: a memfd; unreleased Firecracker: up to 3). */
const MAX_FDS = 3;
/** accept() failed (out of fds): how long the listener is left unwatched. */
const ACCEPT_PAUSE_MS = 100;
const SIGKILL = 9;
/** How soon faults that met EAGAIN (an event pending in the kernel) are retried. */
const RETRY_MS = 1;

interface BoundListener extends Listener {
  fd: number;
  token: number;
  /** Identity of the socket file we created: only that file is removed on shutdown. */
  dev: bigint;
  ino: bigint;
}

/** Binds a listener; a live daemon already on the path is a clear error, not a takeover. */
function listenUnix(path: string, mode: number, id: BigUint64Array): number {
  const fd = sl.sl_unix_listen(cstr(path), mode, 128, id);
  if (fd === -Errno.EADDRINUSE) {
    throw new SocketInUseError(`${path}: another process is listening on this socket (a running snapload?); refusing to replace it`, { path });
  }
  if (fd === -Errno.EEXIST) {
    throw new SocketInUseError(`${path}: exists and is not a stale socket file; refusing to replace it`, { path });
  }
  return check("listen", fd, { path });
}

interface Pending {
  listener: BoundListener;
  fd: number;
  token: number;
  pid: number;
  /** The connecting process, pinned at accept (-errno if unavailable): a reused pid is never signalled. */
  pidfd: number;
  bytes: Uint8Array;
  length: number;
  /** Resumes where the last read's scan stopped: a dripped body costs linear time in total. */
  scanner: JsonScanner;
  /** recvmsg calls so far (a peer that drips its body byte by byte runs out of them). */
  messages: number;
  fds: number[];
  cancelTimer: () => void;
}

export class Server {
  readonly loop: EventLoop;
  readonly vms = new Map<number, VmSession>();
  readonly exits: VmExit[] = [];
  /** Lifecycle counters and what closed VMs counted (the metrics endpoint adds the live VMs). */
  readonly totals = new VmTotals();
  onVmExit: ((exit: VmExit) => void) | undefined;
  private readonly bound: BoundListener[] = [];
  private readonly backends = new Map<VmSession, PageBackend>();
  private readonly requesters = new Map<VmSession, { close(): void }>();
  private readonly scratch = new Scratch();
  private readonly recvBuf = new NativeBuffer(MAX_HANDSHAKE_BYTES);
  private readonly recvFds = new Int32Array(16);
  private readonly recvCounts = new Int32Array(2);
  private readonly pending = new Set<Pending>();
  private readonly tokens = new Map<VmSession, { uffd: number; sock: number }>();
  private readonly populators = new Map<VmSession, Populator>();
  private readonly retryScheduled = new Set<VmSession>();
  private readonly recorders = new Map<VmSession, TouchRecorder>();
  private backgroundOn = false;
  private readonly background = () => this.populateStep();
  private nextId = 1;
  private closed = false;

  constructor(private readonly opts: ServerOptions, loop?: EventLoop) {
    this.loop = loop ?? new EventLoop();
  }

  listen(): void {
    for (const l of this.opts.listeners) {
      const id = new BigUint64Array(2);
      const fd = listenUnix(l.socketPath, l.socketMode, id);
      const b: BoundListener = { ...l, fd, token: -1, dev: id[0]!, ino: id[1]! };
      b.token = this.loop.add(fd, EPOLLIN, () => this.acceptAll(b));
      this.bound.push(b);
    }
  }

  async run(): Promise<void> {
    await this.loop.run();
  }

  private acceptAll(listener: BoundListener): void {
    for (;;) {
      const fd = sl.sl_accept(listener.fd);
      if (fd < 0) {
        if (-fd !== Errno.EAGAIN) {
          // EMFILE/ENFILE leave the peer queued and the listener readable: pause it, do not spin.
          this.opts.logger.warn("daemon.accept_failed", `accept on ${listener.socketPath} failed: ${errnoName(-fd)}; not accepting for ${ACCEPT_PAUSE_MS} ms`, {
            socket: listener.socketPath, errno: errnoName(-fd), pauseMs: ACCEPT_PAUSE_MS,
          });
          this.loop.pause(listener.token, listener.fd, EPOLLIN, ACCEPT_PAUSE_MS);
        }
        return;
      }
      const cred = new Int32Array(3);
      const pid = sl.sl_peer_cred(fd, cred) === 0 ? cred[0]! : -1;
      const pidfd = this.opts.onFatal === "kill" ? sl.sl_peer_pidfd(fd) : -1;
      const p: Pending = { listener, fd, token: -1, pid, pidfd, bytes: new Uint8Array(4096), length: 0, scanner: new JsonScanner(), messages: 0, fds: [], cancelTimer: () => {} };
      this.pending.add(p);
      p.token = this.loop.add(fd, EPOLLIN | EPOLLRDHUP, () => this.readHandshake(p));
      p.cancelTimer = this.loop.after(this.opts.handshakeTimeoutMs, () =>
        this.reject(p, new HandshakeError(`no complete handshake within ${this.opts.handshakeTimeoutMs} ms`)),
      );
    }
  }

  private readHandshake(p: Pending): void {
    const n = sl.sl_recv_fds(p.fd, this.recvBuf.address, MAX_HANDSHAKE_BYTES, this.recvFds, this.recvFds.length, this.recvCounts, this.recvCounts.subarray(1));
    if (n < 0) {
      if (-n === Errno.EAGAIN) return;
      return this.reject(p, new HandshakeError(`reading the handshake failed: ${errnoName(-n)}`));
    }
    for (let i = 0; i < this.recvCounts[0]!; i++) p.fds.push(this.recvFds[i]!);
    // Checked per message, not once the JSON is complete: a peer must not pile up our fds.
    if (p.fds.length > MAX_FDS) return this.reject(p, new HandshakeError(`${p.fds.length} file descriptors came with the handshake; at most ${MAX_FDS} expected`));
    if (this.recvCounts[1]) return this.reject(p, new HandshakeError(`more file descriptors than the ${this.recvFds.length} a handshake may carry`));
    if (n === 0) {
      const what = p.length ? "in the middle of its handshake" : "without sending a handshake";
      return this.reject(p, new HandshakeError(`peer closed the connection ${what}`));
    }
    if (p.length + n > MAX_HANDSHAKE_BYTES) {
      return this.reject(p, new HandshakeError(`handshake larger than ${MAX_HANDSHAKE_BYTES} bytes`));
    }
    if (p.length + n > p.bytes.length) {
      const grown = new Uint8Array(Math.min(MAX_HANDSHAKE_BYTES, Math.max(p.bytes.length * 2, p.length + n)));
      grown.set(p.bytes.subarray(0, p.length));
      p.bytes = grown;
    }
    p.bytes.set(this.recvBuf.bytes.subarray(0, n), p.length);
    p.length += n;
    const scan = p.scanner.feed(p.bytes, p.length);
    if (scan.state === "incomplete") {
      if (++p.messages >= MAX_HANDSHAKE_MESSAGES) {
        return this.reject(p, new HandshakeError(`handshake still incomplete after ${MAX_HANDSHAKE_MESSAGES} reads (${p.length} bytes)`));
      }
      return;
    }
    if (scan.state === "invalid") return this.reject(p, new HandshakeError(`handshake is not valid JSON: ${scan.reason}`));
    try {
      this.accept(p, new TextDecoder("utf-8", { fatal: true }).decode(p.bytes.subarray(0, scan.end)));
    } catch (e) {
      this.reject(p, e instanceof SnaploadError ? e : new HandshakeError(`handshake failed: ${(e as Error).message}`));
    }
  }

  private accept(p: Pending, text: string): void {
    const regions = parseHandshake(text);
    const source = p.listener.source;
    const backend = source.backend;
    checkRegionsFitImage(regions, backend.size);
    if (p.fds.length === 0) throw new HandshakeError("no file descriptor came with the handshake (expected the userfaultfd)");
    if (p.fds.length > MAX_FDS) throw new HandshakeError(`${p.fds.length} file descriptors came with the handshake; at most ${MAX_FDS} expected`);
    const uffds = p.fds.filter((fd) => sl.sl_fd_is_uffd(fd) === 1);
    if (uffds.length === 0) throw new HandshakeError(`none of the ${p.fds.length} file descriptors is a userfaultfd`);
    if (uffds.length > 1) throw new HandshakeError(`${uffds.length} userfaultfds came with the handshake; which one to serve is ambiguous`);
    const uffd = uffds[0]!;
    check("fcntl(O_NONBLOCK)", sl.sl_set_nonblock(uffd));
    // Extra fds (e2b's memfd, future guest_memfd) are not ours to keep.
    for (const fd of p.fds) if (fd !== uffd) sl.sl_close(fd);
    p.fds = [];
    this.forgetPending(p);
    // From here the connection is no longer pending: a failure must release it here, with a log
    // line (reject() only knows pending connections).
    const started: { vm?: VmSession } = {};
    try {
      this.startVm(p, regions, uffd, started);
    } catch (e) {
      const reason = `setting up the VM failed: ${(e as Error).message}`;
      this.opts.logger.error("vm.setup_failed", `connection from pid ${p.pid}: ${reason}; dropped`, { pid: p.pid, reason });
      if (started.vm !== undefined) this.closeVm(started.vm, reason, true);
      else {
        sl.sl_close(uffd);
        sl.sl_close(p.fd);
        if (p.pidfd >= 0) sl.sl_close(p.pidfd);
      }
    }
  }

  /** Everything after the handshake is accepted; `started.vm` is set as soon as there is one to close. */
  private startVm(p: Pending, regions: RegionMapping[], uffd: number, started: { vm?: VmSession }): void {
    const source = p.listener.source;
    const backend = source.backend;
    const table = new HandlerTable(regions, backend);
    const recorder = this.opts.recordPath !== undefined ? new TouchRecorder(Math.ceil(backend.size / 4096)) : undefined;
    const vm = new VmSession(this.nextId++, p.pid, uffd, p.fd, table, this.scratch, { faultAround: this.opts.faultAround, recorder });
    vm.pidfd = p.pidfd;
    started.vm = vm;
    this.vms.set(vm.id, vm);
    this.backends.set(vm, backend);
    if (recorder) this.recorders.set(vm, recorder);
    if (source.openRequester) {
      const requester = source.openRequester(vm, {
        loop: this.loop,
        logger: this.opts.logger,
        fail: (reason) => {
          if (vm.closed) return;
          vm.fatal = reason;
          this.failVm(vm);
        },
        delivered: () => {
          if (vm.closed || vm.detached) return;
          if (vm.fatal !== undefined) return this.failVm(vm);
          if (vm.retry.length) this.serveVm(vm);
          else if (vm.table.complete) this.detachVm(vm);
        },
      });
      vm.setRequester(requester);
      this.requesters.set(vm, requester);
    }
    this.totals.connected++;
    // Set before either add, so closeVm removes whichever was added if the other throws.
    const tokens = { uffd: -1, sock: -1 };
    this.tokens.set(vm, tokens);
    tokens.uffd = this.loop.add(uffd, EPOLLIN, () => this.serveVm(vm));
    tokens.sock = this.loop.add(p.fd, EPOLLRDHUP, (ev) => {
      if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) this.closeVm(vm, "VMM hung up");
    });
    const pageSizes = [...new Set(regions.map((r) => formatBytes(r.pageSize)))].join("/");
    this.opts.logger.info(
      "vm.connected",
      `vm ${vm.id} pid ${vm.pid} connected: ${regions.length} region${regions.length > 1 ? "s" : ""}, ${formatBytes(table.bytes)}, ${pageSizes} pages`,
      { vm: vm.id, pid: vm.pid, socket: p.listener.socketPath, regions: regions.length, bytes: table.bytes, pageSizes: [...new Set(regions.map((r) => r.pageSize))] },
    );
    // A remote source's client does its own background completion (it knows what is in flight).
    const populator = new Populator(vm, p.listener.prefetch, source.openRequester ? "none" : this.opts.populate);
    if (!populator.idle) {
      this.populators.set(vm, populator);
      if (!this.backgroundOn) {
        this.backgroundOn = true;
        this.loop.addBackground(this.background);
      }
    }
    // The VMM may have faulted already, before we watched the uffd.
    this.serveVm(vm);
  }

  private serveVm(vm: VmSession): void {
    if (vm.closed) return;
    // A detached VM may still have a REMOVE queued from before the unregister; its madvise
    // waits until someone reads it, so keep reading (and ignoring) until the VMM hangs up.
    if (vm.detached) {
      vm.discardMessages();
      if (vm.fatal !== undefined) this.failVm(vm);
      return;
    }
    if (!vm.drain()) return this.failVm(vm);
    if (vm.retry.length) this.scheduleRetry(vm);
    else if (vm.table.complete) this.detachVm(vm);
  }

  /** Faults that met EAGAIN are retried after a tick, one timer per VM however often it wakes. */
  private scheduleRetry(vm: VmSession): void {
    if (this.retryScheduled.has(vm)) return;
    this.retryScheduled.add(vm);
    this.loop.after(RETRY_MS, () => {
      this.retryScheduled.delete(vm);
      this.serveVm(vm);
    });
  }

  /** One slice of prefetch/population per VM, round robin; faults are served between slices. */
  private populateStep(): boolean {
    let more = false;
    for (const [vm, populator] of this.populators) {
      if (populator.step()) more = true;
      else this.populators.delete(vm);
      if (vm.fatal !== undefined) this.failVm(vm);
      else if (!vm.closed && !vm.detached && vm.retry.length === 0 && vm.table.complete) this.detachVm(vm);
    }
    if (!more && this.populators.size === 0) {
      this.loop.removeBackground(this.background);
      this.backgroundOn = false;
    }
    return more;
  }

  /** Every page is settled: unregister so the VM no longer depends on us (or on the network). */
  private detachVm(vm: VmSession): void {
    if (!vm.detach()) {
      if (vm.fatal !== undefined) this.failVm(vm);
      return;
    }
    this.populators.delete(vm);
    vm.discardMessages();
    if (vm.fatal !== undefined) return this.failVm(vm);
    this.totals.detached++;
    const s = vm.stats;
    const seconds = (performance.now() - vm.connectedAt) / 1000;
    this.opts.logger.info(
      "vm.detached",
      `vm ${vm.id} pid ${vm.pid} fully populated in ${seconds.toFixed(3)} s (${s.faults} faults, ${s.prefetchedPages} prefetched, ${s.populatedPages} populated pages); detached`,
      { vm: vm.id, pid: vm.pid, seconds, faults: s.faults, prefetchedPages: s.prefetchedPages, populatedPages: s.populatedPages },
    );
  }

  /** Writes the first-touch order of every connected VM (SIGUSR1). */
  writeRecordings(): void {
    for (const vm of this.vms.values()) this.writeRecording(vm);
  }

  private writeRecording(vm: VmSession): void {
    const rec = this.recorders.get(vm);
    const pattern = this.opts.recordPath;
    if (!rec || pattern === undefined) return;
    const path = pattern.replaceAll("{vm}", String(vm.id)).replaceAll("{pid}", String(vm.pid));
    try {
      writeWorkingSet(path, rec.order, this.backends.get(vm)!.size);
      this.opts.logger.info("vm.recorded", `vm ${vm.id} pid ${vm.pid}: recorded ${rec.length} first touches to ${path}`, { vm: vm.id, pid: vm.pid, pages: rec.length, path });
    } catch (e) {
      this.opts.logger.error("vm.record_failed", `vm ${vm.id}: writing the working set to ${path} failed: ${(e as Error).message}`, {
        vm: vm.id, pid: vm.pid, path, error: (e as Error).message, code: (e as { code?: string }).code,
      });
    }
  }

  private failVm(vm: VmSession): void {
    const reason = vm.fatal ?? "unknown failure";
    if (this.opts.onFatal === "kill") {
      // A vCPU blocked in a KVM fault ignores gentler signals (Firecracker's advice). Through the
      // pidfd taken at accept: the pid alone may have been reused by an unrelated process.
      const r = vm.pidfd >= 0 ? sl.sl_pidfd_send_signal(vm.pidfd, SIGKILL) : vm.pidfd;
      const fields = { vm: vm.id, pid: vm.pid, reason };
      if (r === 0) this.opts.logger.error("vm.failed", `vm ${vm.id} pid ${vm.pid}: ${reason}; killed the VMM`, { ...fields, action: "killed" });
      else if (r === -Errno.ESRCH) {
        this.opts.logger.error("vm.failed", `vm ${vm.id} pid ${vm.pid}: ${reason}; the process that connected has exited (not killing pid ${vm.pid}, which may be reused); dropped`, { ...fields, action: "dropped" });
      } else this.opts.logger.error("vm.failed", `vm ${vm.id} pid ${vm.pid}: ${reason}; cannot signal the VMM (${errnoName(-r)}); dropped`, { ...fields, action: "dropped" });
    } else {
      this.opts.logger.error("vm.failed", `vm ${vm.id} pid ${vm.pid}: ${reason}; dropped`, { vm: vm.id, pid: vm.pid, reason, action: "dropped" });
    }
    this.closeVm(vm, `failed: ${reason}`, true);
  }

  closeVm(vm: VmSession, reason: string, quiet = false): void {
    if (vm.closed) return;
    vm.closed = true;
    const t = this.tokens.get(vm);
    if (t) {
      this.loop.remove(t.uffd, vm.uffd);
      this.loop.remove(t.sock, vm.sock);
      this.tokens.delete(vm);
    }
    sl.sl_close(vm.uffd);
    sl.sl_close(vm.sock);
    if (vm.pidfd >= 0) sl.sl_close(vm.pidfd);
    vm.pidfd = -1;
    this.vms.delete(vm.id);
    this.populators.delete(vm);
    this.requesters.get(vm)?.close();
    this.requesters.delete(vm);
    this.writeRecording(vm);
    this.recorders.delete(vm);
    this.backends.delete(vm);
    this.totals.retire(vm);
    // quiet: failVm logged the failure already.
    if (quiet) this.totals.failed++;
    else this.totals.served++;
    const seconds = (performance.now() - vm.connectedAt) / 1000;
    const s = vm.stats;
    const exit: VmExit = { id: vm.id, pid: vm.pid, reason, stats: { ...s }, seconds };
    this.exits.push(exit);
    if (!quiet) {
      this.opts.logger.info(
        "vm.exited",
        `vm ${vm.id} pid ${vm.pid} exited (${reason}): ${s.pagesInstalled} pages served (${s.zeroPagesInstalled} zero) in ${s.faults} faults over ${seconds.toFixed(2)} s`,
        { vm: vm.id, pid: vm.pid, reason, pages: s.pagesInstalled, zeroPages: s.zeroPagesInstalled, faults: s.faults, seconds },
      );
    }
    this.onVmExit?.(exit);
  }

  private reject(p: Pending, e: SnaploadError): void {
    if (!this.pending.has(p)) return;
    this.totals.rejected++;
    this.opts.logger.warn("peer.rejected", `connection from pid ${p.pid} rejected: ${e.message}`, { pid: p.pid, socket: p.listener.socketPath, code: e.code, reason: e.message });
    for (const fd of p.fds) sl.sl_close(fd);
    if (p.pidfd >= 0) sl.sl_close(p.pidfd);
    this.forgetPending(p);
    sl.sl_close(p.fd);
  }

  private forgetPending(p: Pending): void {
    p.cancelTimer();
    this.loop.remove(p.token, p.fd);
    this.pending.delete(p);
  }

  /** Stops serving: closes every connection and removes the socket file. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.loop.stop();
    if (this.vms.size) {
      this.opts.logger.warn("daemon.shutdown_with_vms", `shutting down with ${this.vms.size} VM(s) connected: their next fault will block`, { vms: this.vms.size });
    }
    for (const vm of [...this.vms.values()]) this.closeVm(vm, "snapload shut down");
    for (const p of [...this.pending]) this.reject(p, new HandshakeError("snapload shut down"));
    for (const l of this.bound.splice(0)) {
      this.loop.remove(l.token, l.fd);
      sl.sl_close(l.fd);
      // Only our own socket file: if another daemon has since put its socket there, it stays.
      const r = sl.sl_unix_unlink_if(cstr(l.socketPath), l.dev, l.ino);
      if (r === -Errno.EEXIST) this.opts.logger.warn("daemon.socket_left", `${l.socketPath} is no longer our socket file; left in place`, { socket: l.socketPath, reason: "not ours" });
      else if (r < 0) this.opts.logger.warn("daemon.socket_left", `removing ${l.socketPath} failed: ${errnoName(-r)}`, { socket: l.socketPath, reason: errnoName(-r) });
    }
  }
}
