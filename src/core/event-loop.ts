// The loop every fd of the daemon lives in: one epoll set, drained in C, dispatched by token.
// Bun cannot wait on an arbitrary fd, so the loop blocks in epoll_wait itself and hands the
// thread back to Bun's own event loop every YIELD_EVERY_MS (signals, child processes, timers).
import { check } from "./check.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, NativeBuffer, SL_EPOLL_MAX_EVENTS, SL_EVENT_SIZE, sl } from "./ffi.ts";
import { RecentWork } from "./recent-work.ts";
import { SpinPolicy } from "./spin-policy.ts";

/**
 * Serves an fd's events. A `first` handler may return the work it did (pages installed, ...):
 * when several `first` fds are ready, the one with the least recent work is served first.
 * Nothing returned counts as one unit.
 */
export type FdHandler = (events: number) => number | void;

/** The token an event gets once served in the first pass (no handler ever has it). */
const SERVED = 0xffffffff;
const MAX_EVENTS = SL_EPOLL_MAX_EVENTS;
const YIELD_EVERY_MS = 20;
/**
 * How long the `first` fds of one turn are served while several are ready, before the loop
 * looks for newly ready ones: bounds what a fault that comes in meanwhile waits behind others.
 */
const FIRST_SLICE_MS = 0.1;
/**
 * How long one wait may block while nothing happens. Signals reach Bun's handlers only while we
 * yield, so this bounds the delay of a SIGTERM; it grows while the daemon stays idle (each idle
 * turn costs ~0.1 ms of CPU: Bun's own loop runs) and snaps back at the first event.
 */
const IDLE_WAIT_MS = 50;
const IDLE_WAIT_MAX_MS = 250;

interface Timer {
  at: number;
  fn: () => void;
  cancelled: boolean;
}

export class EventLoop {
  readonly epfd: number;
  private readonly events = new NativeBuffer(MAX_EVENTS * SL_EVENT_SIZE);
  private readonly handlers: (FdHandler | undefined)[] = [];
  /** Per token: served before the other ready fds of a turn (faults, urgent replies). */
  private readonly first: boolean[] = [];
  /** Recent work of the `first` tokens: the order of a contended first pass. */
  private readonly work = new RecentWork();
  /** Scratch of the first pass: indexes of its events. */
  private readonly firstIdx = new Int32Array(MAX_EVENTS);
  private readonly tokenOf = (i: number) => this.events.u32[i * 4]!;
  private firstCount = 0;
  /**
   * True while the loop serves one of several `first` fds ready in the same turn: a handler
   * then does a short slice of its work and leaves the rest for a later turn.
   */
  contended = false;
  /** FIRST_SLICE_MS; 0 serves one `first` fd per contended turn (tests). */
  firstSliceMs = FIRST_SLICE_MS;
  /** Events of the turn being dispatched (0 between turns). */
  private pending = 0;
  private readonly freeTokens: number[] = [];
  private readonly timers: Timer[] = [];
  private readonly background: (() => boolean)[] = [];
  private stopped = false;
  private wake = -1;
  /** Whether and how long to busy-poll before blocking (default: never). */
  spin = new SpinPolicy(0);
  /**
   * Promises in flight whose completions run on Bun's own loop (object-store GETs): while > 0,
   * every turn hands the thread to Bun and no wait exceeds 1 ms, so a completion is seen at once.
   */
  asyncPending = 0;

  constructor() {
    this.epfd = check("epoll_create", sl.sl_epoll_create());
    this.wake = check("eventfd", sl.sl_eventfd());
    this.add(this.wake, 0x001, () => sl.sl_eventfd_drain(this.wake));
  }

  /**
   * Watches fd; returns the token to remove it with. A `first` fd is served before the others
   * ready in the same turn: a vCPU waits on it, while the others (bulk streams) can wait a slice.
   */
  add(fd: number, events: number, handler: FdHandler, first = false): number {
    const token = this.freeTokens.pop() ?? this.handlers.length;
    this.handlers[token] = handler;
    this.first[token] = first;
    if (first) this.firstCount++;
    this.work.reset(token);
    const r = sl.sl_epoll_ctl(this.epfd, EPOLL_CTL_ADD, fd, events, token);
    if (r < 0) {
      this.handlers[token] = undefined;
      if (first) this.firstCount--;
      this.first[token] = false;
      this.freeTokens.push(token);
      check("epoll_ctl(ADD)", r, { fd });
    }
    return token;
  }

  modify(token: number, fd: number, events: number): void {
    check("epoll_ctl(MOD)", sl.sl_epoll_ctl(this.epfd, EPOLL_CTL_MOD, fd, events, token), { fd });
  }

  /**
   * Stops watching fd for ms, then watches `events` again (unless it was removed meanwhile).
   * For a listener whose accept() fails with EMFILE: the peer stays queued and the fd stays
   * readable, so without a pause the loop would spin.
   */
  pause(token: number, fd: number, events: number, ms: number): void {
    const handler = this.handlers[token];
    this.modify(token, fd, 0);
    this.after(ms, () => {
      if (this.handlers[token] === handler) this.modify(token, fd, events);
    });
  }

  /** Stops watching; safe to call from inside a handler, and before the fd is closed. */
  remove(token: number, fd: number): void {
    if (this.handlers[token] === undefined) return;
    sl.sl_epoll_ctl(this.epfd, EPOLL_CTL_DEL, fd, 0, 0);
    this.handlers[token] = undefined;
    // Events of this turn not yet dispatched for it are dropped: a new fd may take the token
    // before they are reached, and must not get the old fd's readiness.
    const u32 = this.events.u32;
    for (let i = 0; i < this.pending; i++) if (u32[i * 4] === token) u32[i * 4] = SERVED;
    if (this.first[token]) this.firstCount--;
    this.first[token] = false;
    this.freeTokens.push(token);
  }

  /** Runs fn after ms; returns a cancel function. */
  after(ms: number, fn: () => void): () => void {
    const t: Timer = { at: performance.now() + ms, fn, cancelled: false };
    let i = this.timers.length;
    while (i > 0 && this.timers[i - 1]!.at > t.at) i--;
    this.timers.splice(i, 0, t);
    return () => {
      if (t.cancelled) return;
      t.cancelled = true;
      // Drop it now: a pending timer makes every loop turn read the clock.
      const k = this.timers.indexOf(t);
      if (k >= 0) this.timers.splice(k, 1);
    };
  }

  /** Work done while no fd is ready (prefetch, background population). Return true while more remains. */
  addBackground(step: () => boolean): void {
    this.background.push(step);
  }

  removeBackground(step: () => boolean): void {
    const i = this.background.indexOf(step);
    if (i >= 0) this.background.splice(i, 1);
  }

  stop(): void {
    this.stopped = true;
    sl.sl_eventfd_signal(this.wake);
  }

  async run(): Promise<void> {
    this.stopped = false;
    const buf = this.events;
    const u32 = buf.u32;
    let lastYield = performance.now();
    let busy = false;
    let active = false;
    let idleWait = IDLE_WAIT_MS;
    let turns = 0;
    while (!this.stopped) {
      let timeout = busy ? 0 : this.asyncPending > 0 ? 1 : idleWait;
      if (this.timers.length) timeout = Math.max(0, Math.min(timeout, Math.ceil(this.timers[0]!.at - performance.now())));
      let n = 0;
      const spinUs = timeout > 0 ? this.spin.budget(active) : 0;
      if (spinUs > 0) {
        // Busy-poll briefly before sleeping: a guest on another CPU that faults again within the
        // window is served without the cross-CPU wake-up (expensive in a VM).
        n = sl.sl_epoll_spin(this.epfd, buf.address, MAX_EVENTS, spinUs);
        if (n > 0) this.spin.hit();
        else this.spin.miss();
      }
      if (n === 0) n = sl.sl_epoll_wait(this.epfd, buf.address, MAX_EVENTS, timeout);
      active = n > 0;
      this.pending = n;
      if (n > 1 && this.firstCount > 0) {
        // Two passes: the `first` fds, then the rest (epoll lists a level-triggered stream that
        // is still readable ahead of a reply that arrived while we were reading it).
        // An event served in the first pass gets a token no handler has, so a handler that removed
        // its fd (and a new fd that took over its token) is not dispatched twice.
        this.firstPass(u32, n);
        for (let i = 0; i < n; i++) if (u32[i * 4] !== SERVED) this.dispatch(u32, i);
      } else {
        for (let i = 0; i < n; i++) this.dispatch(u32, i);
      }
      this.pending = 0;
      this.runTimers();
      // Ready fds were all served first; then one slice of background work, even while faults
      // keep coming — a guest that faults continuously must not starve its own prefetch.
      busy = this.background.length > 0 ? this.runBackground() : false;
      const idle = n === 0 && !busy;
      idleWait = idle ? Math.min(IDLE_WAIT_MAX_MS, idleWait * 2) : IDLE_WAIT_MS;
      // The clock is read every 16 turns only: a turn is a few microseconds when faults stream.
      if (idle || this.asyncPending > 0 || ((++turns & 15) === 0 && performance.now() - lastYield >= YIELD_EVERY_MS)) {
        await yieldToBun();
        lastYield = performance.now();
      }
    }
  }

  /**
   * Serves the turn's `first` events. When several are ready (several VMs faulting), the one
   * whose handler did the least work lately goes first, and once the pass has run for firstSliceMs
   * the rest wait for the next turn: they are level-triggered, so epoll lists them again, and
   * an fd that became ready meanwhile (a VM with one fault) is served after at most one slice,
   * ahead of the fds that were just served. Skipped fds did no work, so they move up by themselves.
   */
  private firstPass(u32: Uint32Array, n: number): void {
    const idx = this.firstIdx;
    let m = 0;
    for (let i = 0; i < n; i++) if (this.first[u32[i * 4]!]) idx[m++] = i;
    if (m === 1) {
      // Uncontended (one VM, with a stream event beside it): no clock, no accounting.
      this.dispatch(u32, idx[0]!);
      u32[idx[0]! * 4] = SERVED;
      return;
    }
    if (m === 0) return;
    const start = performance.now();
    this.work.order(idx, m, this.tokenOf, start);
    let now = start;
    this.contended = true;
    // A handler that throws ends run(); `contended` left true would make every later drain
    // (a loop run again, a retry timer) a short one.
    try {
      for (let k = 0; k < m; k++) {
        const i = idx[k]!;
        const token = u32[i * 4]!;
        if (token === SERVED) continue; // removed by a handler earlier in the turn
        if (k > 0 && now - start >= this.firstSliceMs) {
          u32[i * 4] = SERVED; // not served: listed again next turn
          continue;
        }
        const handler = this.handlers[token];
        const work = this.dispatch(u32, i);
        now = performance.now();
        // Charged only while the token still belongs to the fd that did the work.
        if (handler !== undefined && this.handlers[token] === handler) this.work.charge(token, now, typeof work === "number" ? work : 1);
        u32[i * 4] = SERVED;
      }
    } finally {
      this.contended = false;
    }
  }

  private dispatch(u32: Uint32Array, i: number): number | void {
    // sl_event: u64 data (token < 2^32), u32 events.
    const handler = this.handlers[u32[i * 4]!];
    if (handler !== undefined) return handler(u32[i * 4 + 2]!);
  }

  private runTimers(): void {
    if (!this.timers.length) return;
    const now = performance.now();
    while (this.timers.length && this.timers[0]!.at <= now) {
      const t = this.timers.shift()!;
      if (!t.cancelled) {
        t.cancelled = true;
        t.fn();
      }
    }
  }

  private runBackground(): boolean {
    let more = false;
    for (const step of this.background.slice()) if (step()) more = true;
    return more;
  }

  close(): void {
    sl.sl_close(this.wake);
    sl.sl_close(this.epfd);
    this.events.free();
  }
}

function yieldToBun(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
