// JIT warm-up: before the first VM connects, run the fault path many thousand times against
// memory of our own, so the first restore is served by optimised code rather than by the
// interpreter and the lower JIT tiers. Plain C needs no warm-up; a daemon that restores
// thousands of VMs reaches this state after its first VMs anyway — this spares those.
//
// Two passes: batches of synthetic fault messages fed straight to dispatch (shapes a loaded
// daemon sees: several faults per read, data and zero pages), then real faults — a thread of
// ours touching a userfaultfd-registered buffer — served through the daemon's own event loop,
// drain and installer, so every function on the real path reaches its optimised tier.
// A remote source that can (a store) lends a requester of its own code over bytes it holds, and
// both passes run again through it: its fault path (request, chunk lookup, delivery) is other
// code, which a restore's first faults would otherwise run unoptimised (measured: the tail of a
// warm-cache restore's fault latency).
import { check } from "../core/check.ts";
import type { EventLoop } from "../core/event-loop.ts";
import { EPOLLIN, NativeBuffer, SL_UFFD_MODE_MISSING, sl } from "../core/ffi.ts";
import { HandlerTable } from "../scheduler/handler-table.ts";
import type { Logger } from "../core/log.ts";
import type { ImageBackend, PageRequester, RemoteBackend, RemoteSource } from "../sources/port.ts";
import { IMAGE_PAGE, ZeroMap } from "../sources/image/snapshot-image.ts";
import { writeFaultMessage } from "../sinks/uffd/uffd-messages.ts";
import { Scratch, VmSession } from "./vm-session.ts";

const PAGES = 64;
const MADV_DONTNEED = 4;
const UFFD_FLAGS = 0o2000000 | 0o4000; // O_CLOEXEC | O_NONBLOCK
/**
 * Synthetic rounds through a remote source's requester: its path is longer (request, chunk
 * lookup, delivery), and measured, after 150 rounds its functions still reached JSC's top tier
 * during the first VM (~80 ms of compiling on the guest's CPU); after 600 they have (+~0.2 s of warm-up).
 */
const REMOTE_SYNTHETIC_ROUNDS = 600;
/** A real-fault warm-up that takes longer than this is abandoned (the daemon still starts). */
const REAL_FAULTS_DEADLINE_MS = 10_000;

export interface WarmUpResult {
  /** Faults served: synthetic (fed to dispatch) and real (through the loop). */
  synthetic: number;
  real: number;
  /** The same through a remote source's requester (when one lends it). */
  remoteSynthetic?: number;
  remoteReal?: number;
  ms: number;
}

/** What a warm-up VM looks like (defaults: the local fault path's warm-up). */
export interface WarmUpVmOptions {
  /** Pages of the guest buffer and of the image (default PAGES). */
  pages?: number;
  /** Fills the image's bytes and marks its zero pages (default: 0x5a, the second half zero). */
  fill?: (bytes: Uint8Array, zero: ZeroMap) => void;
  /**
   * Pages come through a requester, not from the image mapping: one a store lends (RemoteWarmUp),
   * or (`"own"`) one the caller sets on `vm` (the postcopy warm-up, a VmClient per round).
   */
  requester?: RemoteWarmUp | "own";
}

const halfZero = (bytes: Uint8Array, zero: ZeroMap) => {
  bytes.fill(0x5a);
  zero.setZeroRange(zero.pages / 2, zero.pages / 2);
};

/** A guest-like buffer registered with a fresh userfaultfd, served from an image of our own. */
export class WarmUpVm {
  readonly uffd: number;
  readonly guest: NativeBuffer;
  readonly source: NativeBuffer;
  readonly scratch = new Scratch();
  readonly zero: ZeroMap;
  readonly table: HandlerTable;
  readonly vm: VmSession;
  readonly len: number;
  private remote: { requester: PageRequester; release(): void } | undefined;

  private constructor(uffd: number, opts: WarmUpVmOptions) {
    const pages = opts.pages ?? PAGES;
    this.uffd = uffd;
    this.len = pages * IMAGE_PAGE;
    this.guest = new NativeBuffer(this.len);
    this.source = new NativeBuffer(this.len);
    const freeAll = () => {
      this.guest.free();
      this.source.free();
      this.scratch.free();
    };
    try {
      check("UFFDIO_API", sl.sl_uffd_api(uffd, 0, null, null));
      check("UFFDIO_REGISTER", sl.sl_uffd_register(uffd, this.guest.address, this.len, SL_UFFD_MODE_MISSING, null));
    } catch (e) {
      freeAll();
      throw e;
    }
    this.zero = new ZeroMap(pages);
    (opts.fill ?? halfZero)(this.source.bytes, this.zero);
    const zero = this.zero;
    // Same shapes as imageBackend() and the remote sources build, so the optimised code fits the real backends.
    const backend: ImageBackend | RemoteBackend = opts.requester === undefined
      ? { kind: "image", size: this.len, zero, base: this.source.address, zeroBytesAreZero: true, description: "warm-up" }
      : { kind: "remote", size: this.len, zero, description: "warm-up" };
    this.table = new HandlerTable([{ base: this.guest.address, size: this.len, offset: 0, pageSize: IMAGE_PAGE }], backend);
    // Options of the same shape as the VM's owner passes: another set of properties is another
    // hidden class, and the fault path optimised for it would be recompiled at the first real VM.
    this.vm = new VmSession(0, uffd, this.table, this.scratch, { faultAround: 1, recorder: undefined, kernel: undefined });
    const remote = opts.requester;
    if (remote !== undefined && remote !== "own" && backend.kind === "remote") {
      const vm = this.vm;
      try {
        this.remote = remote.source.warmUpRequester!(vm, {
          loop: remote.loop,
          logger: remote.logger,
          fail: (code, detail, context) => vm.fail(code, detail, undefined, context),
          delivered: () => {},
        }, backend);
      } catch (e) {
        freeAll();
        throw e;
      }
      vm.setRequester(this.remote.requester);
    }
  }

  /** Undefined without userfaultfd. */
  static open(opts: WarmUpVmOptions = {}): WarmUpVm | undefined {
    const uffd = sl.sl_uffd_open(UFFD_FLAGS);
    if (uffd < 0) return undefined;
    try {
      return new WarmUpVm(uffd, opts);
    } catch (e) {
      sl.sl_close(uffd);
      throw e;
    }
  }

  /**
   * Drops the guest's pages (no REMOVE event: we did not ask for them) and forgets them, so the
   * next round faults again.
   */
  discard(): void {
    sl.sl_madvise(this.guest.address, this.len, MADV_DONTNEED);
    this.reset();
  }

  /** Forgets every page (after the guest buffer was discarded) so the next round faults again. */
  reset(): void {
    for (const r of this.table.regions) {
      r.state.fill(0);
      r.settled = 0;
    }
  }

  close(): void {
    this.remote?.requester.close();
    this.remote?.release();
    sl.sl_close(this.uffd);
    this.guest.free();
    this.source.free();
    this.scratch.free();
  }
}

/** A remote source whose requester is warmed up too (it has warmUpRequester), and what that requester may use. */
export interface RemoteWarmUp {
  source: RemoteSource;
  loop: EventLoop;
  logger: Logger;
}

/** Synthetic pass: `rounds` passes over PAGES pages fed to dispatch. Returns faults served, or -1 without userfaultfd. */
export function warmUpDispatch(rounds = 150, remote?: RemoteWarmUp): number {
  const w = WarmUpVm.open({ requester: remote });
  if (!w) return -1;
  try {
    const msgs = w.scratch.msgs;
    let served = 0;
    for (let round = 0; round < rounds; round++) {
      // Batches of 1..4 faults, as a loaded daemon sees them; every page faults once per round.
      for (let p = 0; p < PAGES; ) {
        const n = Math.min(1 + (p % 4), PAGES - p);
        for (let k = 0; k < n; k++) writeFaultMessage(msgs, k, w.guest.address + (p + k) * IMAGE_PAGE);
        w.vm.dispatch(msgs, n);
        p += n;
        served += n;
      }
      w.discard();
    }
    return w.vm.failure === undefined ? served : 0;
  } finally {
    w.close();
  }
}

/**
 * Real pass: a thread touches every page of a registered buffer, `rounds` times; `loop` serves
 * the faults exactly as it serves a VM's. Runs the loop until done; call before anything else
 * is registered with it. Returns faults served (0 if it failed), or -1 without userfaultfd.
 */
export async function warmUpRealFaults(loop: EventLoop, rounds = 150, remote?: RemoteWarmUp): Promise<number> {
  const w = WarmUpVm.open({ requester: remote });
  if (!w) return -1;
  const done = check("eventfd", sl.sl_eventfd());
  const go = check("eventfd", sl.sl_eventfd());
  const handle = new BigUint64Array(1);
  let started = false;
  let completed = 0;
  let failed = false;
  const tokens: [number, number][] = [];
  try {
    tokens.push([loop.add(w.uffd, EPOLLIN, () => {
      if (!w.vm.drain()) {
        failed = true;
        loop.stop();
      }
    }), w.uffd]);
    tokens.push([loop.add(done, EPOLLIN, () => {
      // The thread waits for `go` after each round: one readable event is one round.
      sl.sl_eventfd_drain(done);
      completed++;
      w.reset();
      if (completed >= rounds) loop.stop();
      else sl.sl_eventfd_signal(go);
    }), done]);
    const cancel = loop.after(REAL_FAULTS_DEADLINE_MS, () => {
      failed = true;
      loop.stop();
    });
    check("toucher", sl.sl_toucher_start(w.guest.address, w.len, IMAGE_PAGE, rounds, done, go, handle));
    started = true;
    await loop.run();
    cancel();
  } finally {
    for (const [token, fd] of tokens) loop.remove(token, fd);
    // Closing the uffd releases a thread still blocked in a fault; then it can be joined.
    w.close();
    if (started) {
      sl.sl_eventfd_signal(go);
      sl.sl_toucher_join(handle[0]!);
    }
    sl.sl_close(done);
    sl.sl_close(go);
  }
  return failed || w.vm.failure !== undefined ? 0 : completed * PAGES;
}

/**
 * Both passes; what the daemon runs before it listens. Then both again through the first of
 * `remotes` that lends a warm-up requester (the code is the same for all of them).
 */
export async function warmUp(loop: EventLoop, remotes?: { sources: RemoteSource[]; logger: Logger }): Promise<WarmUpResult | undefined> {
  const t0 = performance.now();
  const synthetic = warmUpDispatch();
  if (synthetic < 0) return undefined;
  const real = await warmUpRealFaults(loop);
  const result: WarmUpResult = { synthetic, real, ms: 0 };
  const source = remotes?.sources.find((s) => s.warmUpRequester !== undefined);
  if (source !== undefined) {
    const remote = { source, loop, logger: remotes!.logger };
    try {
      result.remoteSynthetic = warmUpDispatch(REMOTE_SYNTHETIC_ROUNDS, remote);
      result.remoteReal = await warmUpRealFaults(loop, 150, remote);
    } catch {
      // No room for the warm-up's chunks (a read-only temp dir): the daemon starts all the same.
      result.remoteSynthetic ??= 0;
      result.remoteReal = 0;
    }
  }
  result.ms = performance.now() - t0;
  return result;
}
