// The first VM after start-up vs the next ones, in-process (issue 10 §3): warm up as `serve`
// does, then serve `--vms` VMs one after another — real faults, a thread of ours touching a
// userfaultfd-registered buffer of `--pages` pages once, served through the event loop — built the
// way the server builds them. Prints the loop thread's CPU time per fault for each VM (schedstat:
// time spent waiting for a CPU does not count, so it is steadier than wall time on a busy host)
// and how often JSC compiled the fault path with its optimising tier (a recompile after the
// warm-up means the warm-up's optimised code was thrown away).
//   bun bench/first-vm.ts [--pages N] [--vms N] [--image FILE] [--no-warm-up]
//     --image FILE: the pages come from FILE mapped as `serve` maps an image (else from memory)
import { readFileSync } from "node:fs";
import { numberOfDFGCompiles } from "bun:jsc";
import { EventLoop } from "../src/core/event-loop.ts";
import { EPOLLIN, NativeBuffer, SL_UFFD_MODE_MISSING, sl } from "../src/core/ffi.ts";
import { HandlerTable } from "../src/scheduler/handler-table.ts";
import type { ImageBackend } from "../src/sources/port.ts";
import { IMAGE_PAGE, mapReadOnly, openRegularFile, ZeroMap } from "../src/sources/image/snapshot-image.ts";
import { Scratch, VmSession } from "../src/daemon/vm-session.ts";
import { warmUp } from "../src/daemon/warmup.ts";

const argv = process.argv.slice(2);
const arg = (name: string): string | undefined => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
};
const PAGES = Number(arg("--pages") ?? 1024);
const VMS = Number(arg("--vms") ?? 6);
const image = arg("--image");
const len = PAGES * IMAGE_PAGE;

/** CPU time of this (the loop's) thread, ns. */
const threadCpuNs = () => Number(readFileSync(`/proc/self/task/${process.pid}/schedstat`, "utf8").split(" ")[0]);
const compiles = () => [VmSession.prototype.dispatch, VmSession.prototype.fault].map((f) => numberOfDFGCompiles(f)).join("/");

const loop = new EventLoop();
if (!argv.includes("--no-warm-up") && (await warmUp(loop)) === undefined) {
  console.error("first-vm bench: no userfaultfd here");
  process.exit(1);
}
const afterWarmUp = compiles();
let base: number;
if (image !== undefined) {
  const f = openRegularFile(image);
  if (f.size < len) throw new Error(`${image} is smaller than ${PAGES} pages`);
  base = mapReadOnly(f.fd, f.size, 0, image);
} else {
  const source = new NativeBuffer(len);
  source.bytes.fill(0x5a);
  base = source.address;
}
// Shared across VMs, as the server's scratch and an opened image are.
const scratch = new Scratch();
const zero = new ZeroMap(PAGES);
const perVm: number[] = [];
for (let v = 1; v <= VMS; v++) {
  const uffd = sl.sl_uffd_open(0o2000000 | 0o4000);
  const guest = new NativeBuffer(len);
  if (uffd < 0 || sl.sl_uffd_api(uffd, 0, null, null) < 0 || sl.sl_uffd_register(uffd, guest.address, len, SL_UFFD_MODE_MISSING, null) < 0) {
    throw new Error("userfaultfd setup failed");
  }
  const backend: ImageBackend = { kind: "image", size: len, zero, base, zeroBytesAreZero: true, description: `raw image ${v}` };
  const table = new HandlerTable([{ base: guest.address, size: len, offset: 0, pageSize: IMAGE_PAGE }], backend);
  const vm = new VmSession(v, uffd, table, scratch, { faultAround: 1, recorder: undefined, kernel: undefined });
  const done = sl.sl_eventfd();
  const go = sl.sl_eventfd();
  const handle = new BigUint64Array(1);
  const tUffd = loop.add(uffd, EPOLLIN, () => {
    if (!vm.drain()) throw new Error(`vm ${v}: ${vm.failure?.detail}`);
  });
  const tDone = loop.add(done, EPOLLIN, () => {
    sl.sl_eventfd_drain(done);
    loop.stop();
  });
  const c0 = threadCpuNs();
  if (sl.sl_toucher_start(guest.address, len, IMAGE_PAGE, 1, done, go, handle) < 0) throw new Error("toucher failed");
  await loop.run();
  perVm.push((threadCpuNs() - c0) / PAGES / 1000);
  loop.remove(tUffd, uffd);
  loop.remove(tDone, done);
  sl.sl_close(uffd);
  sl.sl_eventfd_signal(go);
  sl.sl_toucher_join(handle[0]!);
  sl.sl_close(done);
  sl.sl_close(go);
  guest.free();
}
const later = perVm.slice(1).sort((a, b) => a - b);
const median = later.length ? later[(later.length - 1) >> 1]! : NaN;
console.log(JSON.stringify({
  cpuUsPerFault: perVm.map((x) => +x.toFixed(2)),
  firstVsLaterMedian: +(perVm[0]! / median).toFixed(2),
  dfgCompiles: { afterWarmUp, atEnd: compiles(), what: "dispatch/fault" },
}));
process.exit(0);
