// The daemon's fault path in-process, on a real userfaultfd over memory of our own: batches of
// fault messages through VmSession.dispatch (decode, coalesce, UFFDIO_COPY/ZEROPAGE, wake, and the
// metrics it keeps), pages dropped between rounds. No second process, so it is steadier than the
// end-to-end scenarios for A/B runs of the fault path itself (e.g. with and without a change).
// --js-only passes a kernel whose ioctls do nothing (the session's UffdKernel): what is left is
// the JavaScript of the fault path alone, without the ioctls' cost and their noise on a busy host.
//   bun bench/fault-path.ts [--rounds N] [--batch N] [--js-only]     prints {"nsPerFault": ...} per run
import { NativeBuffer, sl } from "../src/core/ffi.ts";
import { HandlerTable } from "../src/scheduler/handler-table.ts";
import type { ImageBackend } from "../src/sources/port.ts";
import { IMAGE_PAGE, ZeroMap } from "../src/sources/image/snapshot-image.ts";
import { writeFaultMessage } from "../src/sinks/uffd/uffd-messages.ts";
import { Scratch, VmSession } from "../src/daemon/vm-session.ts";
import type { UffdKernel } from "../src/sinks/uffd/kernel.ts";

const argv = process.argv.slice(2);
const arg = (name: string, dflt: number) => {
  const i = argv.indexOf(name);
  return i >= 0 ? Number(argv[i + 1]) : dflt;
};
const ROUNDS = arg("--rounds", 400);
const BATCH = arg("--batch", 4);
const PAGES = 1024;
const MADV_DONTNEED = 4;
const JS_ONLY = argv.includes("--js-only");
const noKernel: UffdKernel = { read: () => 0, copy: () => 0, zeropage: () => 0, wake: () => 0, unregister: () => 0 };

const uffd = sl.sl_uffd_open(0o2000000 | 0o4000);
if (uffd < 0) {
  console.error("fault-path bench: no userfaultfd here");
  process.exit(1);
}
const len = PAGES * IMAGE_PAGE;
const guest = new NativeBuffer(len);
const source = new NativeBuffer(len);
source.bytes.fill(0x5a);
const scratch = new Scratch();
if (sl.sl_uffd_api(uffd, 0, null, null) < 0 || sl.sl_uffd_register(uffd, guest.address, len, 1, null) < 0) {
  console.error("fault-path bench: UFFDIO_API/REGISTER failed");
  process.exit(1);
}
const zero = new ZeroMap(PAGES);
for (let p = 0; p < PAGES; p += 8) zero.setZeroRange(p, 2); // a quarter zero pages, scattered
const backend: ImageBackend = { kind: "image", size: len, zero, base: source.address, zeroBytesAreZero: true, description: "bench" };
const table = new HandlerTable([{ base: guest.address, size: len, offset: 0, pageSize: IMAGE_PAGE }], backend);
const vm = new VmSession(1, uffd, table, scratch, { faultAround: 1, ...(JS_ONLY ? { kernel: noKernel } : {}) });
// A fixed shuffled order of pages: faults do not coalesce, as with a random-touch guest.
const order = Array.from({ length: PAGES }, (_, i) => i);
let seed = 12345;
for (let i = PAGES - 1; i > 0; i--) {
  seed = (seed * 1103515245 + 12345) & 0x7fffffff;
  const j = seed % (i + 1);
  [order[i], order[j]] = [order[j]!, order[i]!];
}

function round(): number {
  const t0 = Bun.nanoseconds();
  for (let p = 0; p < PAGES; p += BATCH) {
    const n = Math.min(BATCH, PAGES - p);
    for (let k = 0; k < n; k++) writeFaultMessage(scratch.msgs, k, guest.address + order[p + k]! * IMAGE_PAGE);
    vm.dispatch(scratch.msgs, n);
  }
  const ns = Bun.nanoseconds() - t0;
  sl.sl_madvise(guest.address, len, MADV_DONTNEED);
  for (const r of table.regions) {
    r.state.fill(0);
    r.settled = 0;
  }
  return ns;
}

for (let i = 0; i < 50; i++) round(); // JIT warm-up
const per: number[] = [];
for (let i = 0; i < ROUNDS; i++) per.push(round() / PAGES);
per.sort((a, b) => a - b);
if (vm.failure !== undefined) {
  console.error(`fault-path bench: ${vm.failure.detail}`);
  process.exit(1);
}
console.log(JSON.stringify({ nsPerFault: Math.round(per[per.length >> 1]!), best: Math.round(per[0]!), p90: Math.round(per[Math.floor(per.length * 0.9)]!), rounds: ROUNDS, batch: BATCH, jsOnly: JS_ONLY }));
