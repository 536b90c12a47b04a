// `snapload serve`: the Unix socket VMMs hand their userfaultfd to. Accepts and checks
// handshakes, then hands each VM to its own VmSupervisor (vm-supervisor.ts), which owns the rest
// of its life. A bad peer costs one log line and its own connection; every other VM keeps being served.
import { check } from "../core/check.ts";
import { HandshakeError, SnaploadError, SocketInUseError } from "../core/errors.ts";
import { EventLoop } from "../core/event-loop.ts";
import { cstr, EPOLLIN, EPOLLRDHUP, Errno, errnoName, NativeBuffer, sl } from "../core/ffi.ts";
import { checkRegionsFitImage, JsonScanner, MAX_HANDSHAKE_BYTES, MAX_HANDSHAKE_MESSAGES, parseHandshake } from "../sinks/uffd/handshake.ts";
import type { UffdKernel } from "../sinks/uffd/kernel.ts";
import { contextFields, type Logger } from "../core/log.ts";
import { VmTotals } from "../metrics/serve-metrics.ts";
import type { PopulateMode } from "../scheduler/populator.ts";
import type { PageSource } from "../sources/port.ts";
import { Scratch } from "./vm-session.ts";
import { type SupervisorDeps, type VmExit, VmSupervisor } from "./vm-supervisor.ts";

export type { VmEnd, VmExit } from "./vm-supervisor.ts";

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
  /** The userfaultfd calls of the fault path (default: the C core). */
  kernel?: UffdKernel;
}

/** Known VMMs send the uffd and at most two more fds (e2b: a memfd; unreleased Firecracker: up to 3). */
const MAX_FDS = 3;
/** accept() failed (out of fds): how long the listener is left unwatched. */
const ACCEPT_PAUSE_MS = 100;

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
  /** The connected VMs; each owns everything of its own (nothing here is kept per VM). */
  readonly vms = new Set<VmSupervisor>();
  readonly exits: VmExit[] = [];
  /** Lifecycle counters and what closed VMs counted (the metrics endpoint adds the live VMs). */
  readonly totals = new VmTotals();
  onVmExit: ((exit: VmExit) => void) | undefined;
  private readonly bound: BoundListener[] = [];
  private readonly recvBuf = new NativeBuffer(MAX_HANDSHAKE_BYTES);
  private readonly recvFds = new Int32Array(16);
  private readonly recvCounts = new Int32Array(2);
  private readonly pending = new Set<Pending>();
  private readonly deps: SupervisorDeps;
  private nextId = 1;
  private closed = false;

  constructor(private readonly opts: ServerOptions, loop?: EventLoop) {
    this.loop = loop ?? new EventLoop();
    this.deps = {
      loop: this.loop,
      logger: opts.logger,
      totals: this.totals,
      scratch: new Scratch(),
      faultAround: opts.faultAround,
      populate: opts.populate,
      onFatal: opts.onFatal,
      recordPath: opts.recordPath,
      kernel: opts.kernel,
      closed: (vm, exit) => {
        this.vms.delete(vm);
        this.exits.push(exit);
        this.onVmExit?.(exit);
      },
    };
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
        return this.reject(p, new HandshakeError(`handshake still incomplete after ${MAX_HANDSHAKE_MESSAGES} reads (${p.length} bytes)`, { reads: MAX_HANDSHAKE_MESSAGES, bytes: p.length }));
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
    checkRegionsFitImage(regions, source.backend.size);
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
    let vm: VmSupervisor | undefined;
    try {
      vm = new VmSupervisor(this.deps, {
        id: this.nextId++,
        pid: p.pid,
        pidfd: p.pidfd,
        uffd,
        sock: p.fd,
        regions,
        source,
        socketPath: p.listener.socketPath,
        ...(p.listener.prefetch !== undefined ? { prefetch: p.listener.prefetch } : {}),
      });
      this.vms.add(vm);
      vm.start();
    } catch (e) {
      const detail = `setting up the VM failed: ${(e as Error).message}`;
      const code = e instanceof SnaploadError ? e.code : "SYSCALL";
      this.opts.logger.error("vm.setup_failed", `connection from pid ${p.pid}: ${detail}; dropped`, { pid: p.pid, reason: detail, code });
      if (vm !== undefined) vm.close({ kind: "failed", code, detail });
      else {
        sl.sl_close(uffd);
        sl.sl_close(p.fd);
        if (p.pidfd >= 0) sl.sl_close(p.pidfd);
      }
    }
  }

  /** Writes the first-touch order of every connected VM (SIGUSR1). */
  writeRecordings(): void {
    for (const vm of this.vms) vm.writeRecording();
  }

  private reject(p: Pending, e: SnaploadError): void {
    if (!this.pending.has(p)) return;
    this.totals.rejected++;
    this.opts.logger.warn("peer.rejected", `connection from pid ${p.pid} rejected: ${e.message}`, {
      ...contextFields(e.context), pid: p.pid, socket: p.listener.socketPath, code: e.code, reason: e.message,
    });
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
    for (const vm of [...this.vms]) vm.close({ kind: "shutdown" });
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
