// Races on the fault path, and a VMM that forks. The fault path is driven with a fake kernel
// (a UffdKernel passed to the session, as the daemon passes the real one), so races that are hard
// to hit with real processes (an event pending between reading a batch and installing it, a
// fault racing the unregister, a copy cut short) are deterministic.
import { describe, expect, test } from "bun:test";
import { Errno, NativeBuffer } from "../src/core/ffi.ts";
import { HandlerTable, PAGE_IN_FLIGHT, PAGE_INSTALLED, PAGE_MISSING, PAGE_REMOVED } from "../src/scheduler/handler-table.ts";
import { ZeroMap } from "../src/sources/image/snapshot-image.ts";
import { writeFaultMessage } from "../src/sinks/uffd/uffd-messages.ts";
import { AGAIN, EXISTED, GONE, INSTALLED, type ImageBackend, installErrno, type PageRegion, type PageRequester, type RemoteBackend } from "../src/sources/port.ts";
import { DRAIN_SLICE_NS, MAX_DRAIN_ROUNDS, Scratch, VmSession } from "../src/daemon/vm-session.ts";
import { FAKE_BASE as BASE, FakeKernel, FAKE_PAGE as PS } from "./fake-kernel.ts";

const PAGES = 64;
const EBUSY = 16;

function setup(zeroPages: number[] = [], faultAround = 1) {
  const zero = new ZeroMap(PAGES);
  for (const p of zeroPages) zero.setZero(p);
  const backend: ImageBackend = { kind: "image", size: PAGES * PS, zero, base: 0x1000_0000, zeroBytesAreZero: true, description: "fake" };
  const table = new HandlerTable([{ base: BASE, size: PAGES * PS, offset: 0, pageSize: PS }], backend);
  const scratch = new Scratch();
  const kernel = new FakeKernel();
  const vm = new VmSession(1, 999, table, scratch, { faultAround, kernel });
  return { vm, kernel, scratch, region: table.regions[0]!, [Symbol.dispose]: () => scratch.free() };
}

/** Serves one batch the way the event loop does: read, dispatch, and the retries the owner schedules. */
function faultBatch(scratch: Scratch, pages: number[]): void {
  pages.forEach((p, i) => writeFaultMessage(scratch.msgs, i, BASE + p * PS));
}

describe("coalesced faults that meet EAGAIN", () => {
  test("every vCPU of a coalesced run is served once the pending event is read", () => {
    using t = setup();
    const { vm, kernel, region } = t;
    // Two vCPUs fault on neighbouring pages; a REMOVE elsewhere is queued but not yet read.
    kernel.touch(10);
    kernel.touch(11);
    kernel.eagain = 1;
    expect(vm.drain()).toBe(true);
    expect(vm.retry.length).toBe(2); // both, not only the first page of the run
    expect(vm.stats.eagain).toBeGreaterThanOrEqual(1);
    // The REMOVE has been read: installs work again; the retries run.
    kernel.eagain = 0;
    expect(vm.serveRetries()).toBe(true);
    expect(region.state[10]).toBe(PAGE_INSTALLED);
    expect(region.state[11]).toBe(PAGE_INSTALLED);
    expect([...kernel.sleeping]).toEqual([]); // nobody left blocked forever
    expect(vm.failure).toBeUndefined();
  });

  test("a page that already existed is woken even when a later page of the run meets EAGAIN", () => {
    // Page 20 is zero, page 21 data: two runs. Page 20 was installed (unwoken) by the background sweep.
    using t = setup([20]);
    const { vm, kernel, scratch, region } = t;
    kernel.touch(20);
    kernel.touch(21);
    kernel.queue.length = 0; // read below, as one batch
    kernel.present.add(20); // its fault was queued before the sweep installed it with DONTWAKE
    region.setState(20, PAGE_INSTALLED);
    // The zero page meets EEXIST; then an event gets queued before the data page's ioctl.
    kernel.afterInstall = () => {
      kernel.eagain = 1;
      kernel.afterInstall = undefined;
    };
    faultBatch(scratch, [20, 21]);
    vm.dispatch(scratch.msgs, 2);
    expect(kernel.sleeping.has(20)).toBe(false); // woken now, not after the retry
    expect(vm.retry).toEqual([BASE + 21 * PS]);
    kernel.eagain = 0;
    vm.serveRetries();
    expect(region.state[21]).toBe(PAGE_INSTALLED);
    expect([...kernel.sleeping]).toEqual([]);
  });

  test("a REMOVE read in the same batch as a fault is applied first: the fault gets a zero page, not stale data", () => {
    using t = setup();
    const { vm, kernel, region } = t;
    kernel.present.add(30);
    region.setState(30, PAGE_INSTALLED);
    kernel.discard(30, 1);
    kernel.touch(30);
    expect(vm.drain()).toBe(true);
    expect(kernel.calls).toContain("zeropage 30+1 -> 0");
    expect(region.state[30]).toBe(PAGE_REMOVED);
    expect([...kernel.sleeping]).toEqual([]);
  });
});

describe("partial copies", () => {
  test("a copy cut short goes on from where it stopped, and every waiter of the run is woken", () => {
    using t = setup([], 8);
    const { vm, kernel, region } = t;
    kernel.touch(8);
    kernel.touch(9);
    kernel.partialNext = 1; // the fault-around run's first ioctl installs one page only
    expect(vm.drain()).toBe(true);
    for (let p = 8; p < 16; p++) expect(region.state[p]).toBe(PAGE_INSTALLED);
    expect(vm.stats.pagesInstalled).toBe(8);
    expect(vm.retry.length).toBe(0);
    expect([...kernel.sleeping]).toEqual([]);
  });

  test("a page someone installed first (EEXIST) inside a run is skipped and counted, the rest installed and woken", () => {
    using t = setup();
    const { vm, kernel, region } = t;
    kernel.present.add(41); // installed behind our back: the table still says missing
    kernel.touch(40);
    kernel.queue.push({ kind: "fault", page: 41 }); // its vCPU slept before the page appeared
    kernel.sleeping.add(41);
    kernel.touch(42);
    expect(vm.drain()).toBe(true);
    expect(vm.stats.eexist).toBe(1);
    for (const p of [40, 41, 42]) expect(region.state[p]).toBe(PAGE_INSTALLED);
    expect([...kernel.sleeping]).toEqual([]);
  });
});

describe("typed install outcomes", () => {
  test("the installer reports INSTALLED, EXISTED, AGAIN, GONE and -errno, with no state left behind", () => {
    using t = setup();
    const { vm, kernel, region } = t;
    const ins = vm.installer;
    expect(ins.installRun(region, 0, 2, false, true)).toBe(INSTALLED);
    expect(ins.installRun(region, 1, 2, false, true)).toBe(EXISTED);
    expect(ins.installRun(region, 3, 1, false, true)).toBe(INSTALLED); // EXISTED is per call
    kernel.eagain = 1;
    expect(ins.installRun(region, 4, 1, false, true)).toBe(AGAIN);
    kernel.eagain = 0;
    kernel.failNext = Errno.ESRCH;
    expect(ins.installRun(region, 4, 1, false, true)).toBe(GONE);
    kernel.failNext = 14; // EFAULT
    const r = ins.installRun(region, 4, 1, false, true);
    expect(r).toBeLessThan(0);
    expect(installErrno(r)).toBe(14);
    expect(ins.installRun(region, 4, 1, false, true)).toBe(INSTALLED);
  });

  test("a failed install fails the VM once, with its code and errno", () => {
    using t = setup();
    const { vm, kernel } = t;
    kernel.touch(5);
    kernel.failNext = 14; // EFAULT
    expect(vm.drain()).toBe(false);
    expect(vm.failure).toMatchObject({ kind: "failed", code: "SYSCALL", errno: 14 });
    expect(vm.failure!.detail).toMatch(/^installing page 0x[0-9a-f]+ failed: EFAULT$/);
    vm.fail("PEER_GONE", "later"); // the first cause stays
    expect(vm.failure!.code).toBe("SYSCALL");
  });

  test("a range that went away (ENOENT) is not a failure: nothing to install, nobody to retry", () => {
    using t = setup();
    const { vm, kernel } = t;
    kernel.touch(6);
    kernel.failNext = Errno.ENOENT;
    expect(vm.drain()).toBe(true);
    expect(vm.failure).toBeUndefined();
    expect(vm.retry.length).toBe(0);
  });

  test("a fault outside every announced region fails the VM as UNANNOUNCED_MEMORY", () => {
    using t = setup();
    const { vm, kernel } = t;
    kernel.queue.push({ kind: "fault", page: PAGES + 10 });
    expect(vm.drain()).toBe(false);
    expect(vm.failure).toMatchObject({ kind: "failed", code: "UNANNOUNCED_MEMORY" });
  });
});

describe("the unregister race", () => {
  test("a fault queued while every page was being settled is woken after the unregister", () => {
    using t = setup();
    const { vm, kernel, region } = t;
    vm.installMissing(region, 0, PAGES, 0);
    expect(vm.table.complete).toBe(true);
    // A vCPU faulted on a page that was installed meanwhile; the message is still queued.
    kernel.sleeping.add(7);
    kernel.queue.push({ kind: "fault", page: 7 });
    expect(vm.detach()).toBe(true);
    vm.discardMessages();
    expect(kernel.calls.slice(-2)).toEqual(["unregister", "wake 7+1"]);
    expect([...kernel.sleeping]).toEqual([]);
    expect(vm.failure).toBeUndefined();
  });

  test("after the unregister, a fault outside every region still fails the VM, once the whole batch was read", () => {
    using t = setup();
    const { vm, kernel, region } = t;
    vm.installMissing(region, 0, PAGES, 0);
    expect(vm.detach()).toBe(true);
    kernel.queue.push({ kind: "fault", page: PAGES + 1 }, { kind: "fault", page: 3 });
    kernel.sleeping.add(3);
    vm.discardMessages();
    expect(vm.failure?.code).toBe("UNANNOUNCED_MEMORY");
    expect(kernel.sleeping.has(3)).toBe(false);
  });

  test("an unregister the kernel refuses fails the VM with its errno", () => {
    using t = setup();
    const { vm, kernel, region } = t;
    vm.installMissing(region, 0, PAGES, 0);
    kernel.unregister = () => -EBUSY;
    expect(vm.detach()).toBe(false);
    expect(vm.failure).toMatchObject({ code: "SYSCALL", errno: EBUSY });
  });
});

describe("pages that arrive later (a remote source)", () => {
  function remoteSetup() {
    const zero = new ZeroMap(PAGES);
    const backend: RemoteBackend = { kind: "remote", size: PAGES * PS, zero, description: "fake remote" };
    const table = new HandlerTable([{ base: BASE, size: PAGES * PS, offset: 0, pageSize: PS }], backend);
    const scratch = new Scratch();
    const kernel = new FakeKernel();
    const vm = new VmSession(1, 999, table, scratch, { faultAround: 1, kernel });
    const asked: [number, number, boolean][] = [];
    const requester: PageRequester = {
      request: (_r: PageRegion, first, count, urgent) => void asked.push([first, count, urgent]),
      hurry: () => {},
      close: () => {},
    };
    vm.setRequester(requester);
    const src = new NativeBuffer(PAGES * PS);
    return { vm, kernel, region: table.regions[0]!, asked, src: src.address as number, [Symbol.dispose]: () => (scratch.free(), src.free()) };
  }

  test("a delivery that meets EAGAIN leaves the pages to the retry; nothing is guessed", () => {
    using t = remoteSetup();
    const { vm, kernel, region, asked, src } = t;
    kernel.touch(12);
    vm.drain();
    expect(asked).toEqual([[12, 1, true]]);
    expect(region.state[12]).toBe(PAGE_IN_FLIGHT);
    kernel.eagain = 1;
    expect(vm.deliver(region, 12, 1, src)).toBe(AGAIN);
    expect(region.state[12]).toBe(PAGE_MISSING);
    expect(vm.retry).toEqual([BASE + 12 * PS]);
    expect(kernel.sleeping.has(12)).toBe(true);
  });

  test("a delivery whose page someone installed first still wakes the vCPU waiting on it", () => {
    using t = remoteSetup();
    const { vm, kernel, region, src } = t;
    kernel.touch(13);
    vm.drain();
    kernel.present.add(13); // e.g. the VMM populated it itself; its waiter still sleeps
    expect(vm.deliver(region, 13, 1, src)).toBe(INSTALLED);
    expect(kernel.sleeping.has(13)).toBe(false);
  });
});

describe("drain() while installs keep meeting EAGAIN (issue 8)", () => {
  // The REMOVE was read, but the VMM thread that madvise()d has not run since (throttled): the
  // kernel keeps answering EAGAIN and the uffd stays empty. drain() used to re-read the empty uffd
  // and retry forever, holding the one loop every VM is served from.
  test("returns after one more read of the empty queue, keeping the fault for a later retry", () => {
    using t = setup();
    const { vm, kernel, scratch, region } = t;
    kernel.readHook = () => {
      // Bounded here so the old behaviour ends the test instead of hanging it.
      if (kernel.reads >= 1000) kernel.eagain = 0;
      return 0;
    };
    kernel.sleeping.add(5);
    kernel.eagain = 1;
    faultBatch(scratch, [5]);
    vm.dispatch(scratch.msgs, 1);
    expect(vm.retry.length).toBe(1);
    expect(vm.drain()).toBe(true);
    expect(kernel.reads).toBeLessThanOrEqual(2);
    expect(vm.retry.length).toBe(1); // still owed: the owner retries it after a tick
    expect(kernel.sleeping.has(5)).toBe(true);
    // The VMM thread has run: the retry installs the page and wakes the vCPU.
    kernel.eagain = 0;
    expect(vm.serveRetries()).toBe(true);
    expect(region.state[5]).toBe(PAGE_INSTALLED);
    expect([...kernel.sleeping]).toEqual([]);
  });

  test("a VMM that keeps its uffd full is read at most MAX_DRAIN_ROUNDS times per drain()", () => {
    using t = setup();
    const { vm, kernel, scratch } = t;
    // Every read returns a full batch of faults (the fake kernel answers EEXIST after the first).
    kernel.readHook = () => {
      if (kernel.reads >= 1000) return 0;
      faultBatch(scratch, Array.from({ length: Scratch.MAX_MSGS }, (_, i) => i % PAGES));
      return Scratch.MAX_MSGS;
    };
    expect(vm.drain()).toBe(true);
    // Fewer when the rounds took DRAIN_SLICE_NS (a slow machine): never more, and past the first.
    expect(kernel.reads).toBeGreaterThanOrEqual(2);
    expect(kernel.reads).toBeLessThanOrEqual(MAX_DRAIN_ROUNDS);
  });

  test("a drain reads no more once DRAIN_SLICE_NS have passed; a contended one reads what it is told", () => {
    using t = setup();
    const { vm, kernel, scratch } = t;
    kernel.readHook = (_buf, max) => {
      // A slow round: the kernel itself takes the whole slice (a busy wait stands in for the work).
      const until = Bun.nanoseconds() + DRAIN_SLICE_NS;
      while (Bun.nanoseconds() < until);
      faultBatch(scratch, Array.from({ length: max }, (_, i) => i % PAGES));
      return max;
    };
    expect(vm.drain()).toBe(true);
    expect(kernel.reads).toBe(2);
    // What the daemon does while other VMs' faults wait in the same turn: one short read.
    kernel.readHook = (_buf, max) => {
      faultBatch(scratch, Array.from({ length: max }, (_, i) => i % PAGES));
      return max;
    };
    const faults = vm.stats.faults;
    expect(vm.drain(8, 1)).toBe(true);
    expect(kernel.reads).toBe(3);
    expect(vm.stats.faults - faults).toBe(8);
  });
});

// ---- a hostile VMM: UFFD_FEATURE_EVENT_FORK ---------------------------------------------------
import { readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { ensureBuilt, startDaemon, tempDir } from "./harness.ts";

const FORKER_C = String.raw`
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int n = atoi(argv[2]);
  size_t len = 1 << 20;
  char *mem = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMOVE };
  if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) { perror("uffd"); return 2; }
  struct uffdio_register reg = { .range = { (unsigned long)mem, len }, .mode = UFFDIO_REGISTER_MODE_MISSING };
  if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("register"); return 2; }
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un a = { .sun_family = AF_UNIX };
  strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
  if (connect(s, (void *)&a, sizeof a)) { perror("connect"); return 2; }
  char body[256];
  snprintf(body, sizeof body, "[{\"base_host_virt_addr\":%lu,\"size\":%zu,\"offset\":0,\"page_size\":4096}]", (unsigned long)mem, len);
  struct iovec iov = { body, strlen(body) };
  char cbuf[CMSG_SPACE(sizeof(int))] = {0};
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
  struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &uffd, sizeof(int));
  if (sendmsg(s, &mh, 0) < 0) { perror("sendmsg"); return 2; }
  volatile char x = mem[0]; (void)x; /* served: the handshake was accepted */
  for (int i = 0; i < n; i++) { pid_t p = fork(); if (p == 0) _exit(0); waitpid(p, 0, 0); }
  printf("forked %d\n", n); fflush(stdout);
  sleep(30);
  return 0;
}
`;

describe("hostile VMM", () => {
  test("UFFD_EVENT_FORK messages do not leak a userfaultfd into the daemon per fork", async () => {
    ensureBuilt();
    const dir = tempDir();
    try {
      const image = join(dir.path, "vm.mem");
      writeDemoImage(image, 4 * 1024 * 1024, 3);
      const src = join(dir.path, "forker.c");
      const bin = join(dir.path, "forker");
      writeFileSync(src, FORKER_C);
      const cc = Bun.spawnSync(["cc", "-O1", "-o", bin, src], { stderr: "pipe" });
      expect(cc.exitCode, cc.stderr.toString()).toBe(0);
      const sock = join(dir.path, "fork.sock");
      const d = await startDaemon(["--mem", image], sock);
      const fdCount = () => readdirSync(`/proc/${d.proc.pid}/fd`).length;
      const before = fdCount();
      const vmm = Bun.spawn([bin, sock, "200"], { stdout: "pipe", stderr: "pipe" });
      const reader = vmm.stdout.getReader();
      const { value } = await reader.read();
      expect(new TextDecoder().decode(value)).toContain("forked 200");
      const during = fdCount();
      vmm.kill("SIGKILL");
      await vmm.exited;
      await d.stop();
      // The VM's own uffd and socket: +2. One leaked uffd per fork would be +202.
      expect(during - before).toBeLessThanOrEqual(4);
    } finally {
      dir.cleanup();
    }
  });
});
