// The owner of one VM (VmSupervisor): its one decision point and its close. The uffd calls go
// to a model of the kernel (test/fake-kernel.ts); the event loop, its epoll set and timers are
// real (eventfds stand in for the VM's uffd and socket: epoll watches them, nobody signals them).
import { afterEach, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { EventLoop } from "../src/core/event-loop.ts";
import { sl } from "../src/core/ffi.ts";
import { Logger } from "../src/core/log.ts";
import { Scratch } from "../src/daemon/vm-session.ts";
import { type VmExit, VmSupervisor } from "../src/daemon/vm-supervisor.ts";
import { VmTotals } from "../src/metrics/serve-metrics.ts";
import { ZeroMap } from "../src/sources/image/snapshot-image.ts";
import { PAGE_INSTALLED, type PageRequester, type PageSource, type RequesterContext } from "../src/sources/port.ts";
import { FAKE_BASE, FakeKernel, FAKE_PAGE } from "./fake-kernel.ts";

const PAGES = 32;

let cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

/** `stopOn`: the loop stops when this event is logged (tests wait on events, not on time). */
function harness(source: PageSource, opts: { populate?: "none" | "background"; stopOn?: string } = {}) {
  const loop = new EventLoop();
  const scratch = new Scratch();
  cleanups.push(() => scratch.free(), () => loop.close());
  const kernel = new FakeKernel();
  const events: Record<string, unknown>[] = [];
  const logger = new Logger("debug", {
    format: "json",
    sink: (l) => {
      const e = JSON.parse(l) as Record<string, unknown>;
      events.push(e);
      if (e.event === opts.stopOn) loop.stop();
    },
  });
  const totals = new VmTotals();
  const exits: VmExit[] = [];
  const uffd = sl.sl_eventfd();
  const sock = sl.sl_eventfd();
  const vm = new VmSupervisor(
    { loop, logger, totals, scratch, faultAround: 1, populate: opts.populate ?? "none", onFatal: "drop", kernel, closed: (_vm, exit) => exits.push(exit) },
    { id: 1, pid: process.pid, pidfd: -1, uffd, sock, regions: [{ base: FAKE_BASE, size: PAGES * FAKE_PAGE, offset: 0, pageSize: FAKE_PAGE }], source, socketPath: "test.sock" },
  );
  cleanups.push(() => vm.close({ kind: "shutdown" }));
  const named = (name: string) => events.filter((e) => e.event === name);
  return { loop, kernel, vm, totals, exits, named, uffd, sock };
}

const imageSource = (): PageSource => ({
  kind: "image",
  backend: { kind: "image", size: PAGES * FAKE_PAGE, zero: new ZeroMap(PAGES), base: 0x1000_0000, zeroBytesAreZero: true, description: "fake image" },
});

describe("VmSupervisor", () => {
  test("a failure a requester reports inside the fault path is acted on once, after it returns; close releases everything", () => {
    let ctx: RequesterContext | undefined;
    let closes = 0;
    let requests = 0;
    const requester: PageRequester = {
      request: () => {
        requests++;
        // As a store requester does when the chunk cannot be had: from inside the fault path.
        ctx!.fail("STORE_UNAVAILABLE", "chunk 0 of \"vm\": the store answered 503 until the deadline");
      },
      hurry: () => {},
      close: () => void closes++,
    };
    const source: PageSource = {
      kind: "remote",
      backend: { kind: "remote", size: PAGES * FAKE_PAGE, zero: new ZeroMap(PAGES), description: "fake store" },
      openRequester: (_vm, c) => {
        ctx = c;
        return requester;
      },
    };
    const { kernel, vm, totals, exits, named, uffd, sock } = harness(source);
    kernel.touch(3);
    kernel.touch(9); // a second fault in the same batch: the batch stops at the failure
    vm.start();
    expect(requests).toBe(1);
    expect(vm.closed).toBe(true);
    expect(named("vm.failed")).toHaveLength(1);
    expect(named("vm.failed")[0]).toMatchObject({ vm: 1, code: "STORE_UNAVAILABLE", action: "dropped" });
    expect(named("vm.exited")).toHaveLength(0); // a failure is logged once, as vm.failed
    expect(exits).toHaveLength(1);
    expect(exits[0]!.end).toMatchObject({ kind: "failed", code: "STORE_UNAVAILABLE" });
    expect(exits[0]!.reason).toStartWith("failed: chunk 0");
    expect(closes).toBe(1);
    expect(totals.failed).toBe(1);
    expect(totals.connected).toBe(1);
    // Its fds are closed (nothing else was opened meanwhile, so the numbers are not reused).
    expect(existsSync(`/proc/self/fd/${uffd}`)).toBe(false);
    expect(existsSync(`/proc/self/fd/${sock}`)).toBe(false);
    // Reported again (a late callback): nothing more happens.
    ctx!.fail("PEER_GONE", "late");
    ctx!.delivered();
    vm.close({ kind: "hung-up" });
    expect(exits).toHaveLength(1);
    expect(named("vm.failed")).toHaveLength(1);
    expect(closes).toBe(1);
  });

  test("faults that met EAGAIN are retried on the loop's timer until they go in, and the vCPU is woken", async () => {
    const { loop, kernel, vm, named } = harness(imageSource());
    kernel.touch(5);
    kernel.eagain = 1;
    let attempts = 0;
    kernel.afterInstall = () => {
      attempts++;
      if (attempts === 3) kernel.eagain = 0; // the pending REMOVE was read meanwhile
      if (!kernel.sleeping.has(5)) loop.stop();
    };
    vm.start();
    expect(kernel.sleeping.has(5)).toBe(true);
    await loop.run();
    expect(attempts).toBeGreaterThanOrEqual(4);
    expect(kernel.sleeping.size).toBe(0);
    expect(vm.session.table.regions[0]!.state[5]).toBe(PAGE_INSTALLED);
    expect(named("vm.failed")).toHaveLength(0);
  });

  test("with --populate background the VM is detached once every page is in, then served until its VMM hangs up", async () => {
    const { loop, kernel, vm, totals, exits, named, uffd } = harness(imageSource(), { populate: "background", stopOn: "vm.detached" });
    kernel.touch(0);
    vm.start();
    await loop.run();
    expect(vm.detached).toBe(true);
    expect(kernel.calls.indexOf("unregister")).toBeGreaterThan(0);
    expect(kernel.present.size).toBe(PAGES);
    expect(kernel.sleeping.size).toBe(0);
    expect(totals.detached).toBe(1);
    expect(named("vm.detached")).toHaveLength(1);
    // After the unregister a fault that raced it is only woken (the range is not ours any more).
    kernel.sleeping.add(7);
    kernel.queue.push({ kind: "fault", page: 7 });
    const wake = kernel.wake.bind(kernel);
    kernel.wake = (u, start, len) => {
      loop.stop();
      return wake(u, start, len);
    };
    sl.sl_eventfd_signal(uffd); // the uffd is readable
    await loop.run();
    expect(kernel.sleeping.size).toBe(0);
    expect(kernel.calls.at(-1)).toBe("wake 7+1");
    vm.close({ kind: "hung-up" });
    expect(exits.map((e) => [e.end.kind, e.reason])).toEqual([["hung-up", "VMM hung up"]]);
    expect(totals.served).toBe(1);
  });
});

describe("VMs sharing one loop", () => {
  test("a VM with one fault is not queued behind another VM's full drain: a contended drain is short, and the rest waits its turn", async () => {
    const loop = new EventLoop();
    loop.firstSliceMs = 0;
    const scratch = new Scratch();
    cleanups.push(() => scratch.free(), () => loop.close());
    const logger = new Logger("error", { format: "json", sink: () => {} });
    const totals = new VmTotals();
    const vm = (id: number, kernel: FakeKernel) => {
      const uffd = sl.sl_eventfd();
      const s = new VmSupervisor(
        { loop, logger, totals, scratch, faultAround: 1, populate: "none", onFatal: "drop", kernel, closed: () => {} },
        { id, pid: process.pid, pidfd: -1, uffd, sock: sl.sl_eventfd(), regions: [{ base: FAKE_BASE, size: PAGES * FAKE_PAGE, offset: 0, pageSize: FAKE_PAGE }], source: imageSource(), socketPath: "test.sock" },
      );
      cleanups.push(() => s.close({ kind: "shutdown" }));
      s.start();
      return { s, uffd };
    };
    const heavyKernel = new FakeKernel();
    const smallKernel = new FakeKernel();
    const heavy = vm(1, heavyKernel);
    const small = vm(2, smallKernel);
    // 16 vCPUs of the heavy VM fault (on pages apart: no coalescing), then one of the small VM.
    for (let p = 0; p < PAGES; p += 2) heavyKernel.touch(p);
    smallKernel.touch(5);
    smallKernel.afterInstall = () => loop.stop();
    // The eventfds stand in for the uffds: readable, heavy first in epoll's order.
    sl.sl_eventfd_signal(heavy.uffd);
    sl.sl_eventfd_signal(small.uffd);
    await loop.run();
    expect(small.s.session.table.regions[0]!.state[5]).toBe(PAGE_INSTALLED);
    expect([...smallKernel.sleeping]).toEqual([]);
    // The heavy VM was served first (epoll's order, no work yet on either) but read 8 of its 16
    // faults; before, it served all 16 while the small VM waited.
    expect(heavy.s.session.stats.faults).toBe(8);
    expect(heavyKernel.queue.length).toBe(8);
    // The rest is served in later turns.
    smallKernel.afterInstall = undefined;
    heavyKernel.afterInstall = () => {
      if (heavyKernel.queue.length === 0) loop.stop();
    };
    await loop.run();
    expect(heavy.s.session.stats.faults).toBe(16);
    expect([...heavyKernel.sleeping]).toEqual([]);
  });
});
