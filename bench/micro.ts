// Micro-benchmarks (mitata) of the pieces on snapload's fault path.
//   bun bench/micro.ts [--out FILE] [--quick]
// Prints mitata's report on stderr; writes a ns/op summary as JSON to FILE.
import { bench, do_not_optimize, group, run } from "mitata";
import { NativeBuffer, sl, UFFD_MSG_SIZE } from "../src/core/ffi.ts";
import { HandlerTable } from "../src/scheduler/handler-table.ts";
import type { ImageBackend } from "../src/sources/port.ts";
import { ZeroMap } from "../src/sources/image/snapshot-image.ts";
import { decodeMessages, writeFaultMessage } from "../src/sinks/uffd/uffd-messages.ts";
import { prng } from "./common.ts";

const argv = process.argv.slice(2);
const outIdx = argv.indexOf("--out");
const out = outIdx >= 0 ? argv[outIdx + 1] : undefined;

const PAGE = 4096;
const BATCH = 64;
const rnd = prng(42);

// ---- a batch of 64 uffd_msg (struct uffd_msg: u8 event; ...; pagefault.flags u64 @8, address u64 @16)
const msgs = new NativeBuffer(BATCH * UFFD_MSG_SIZE);
const GUEST_BASE = 0x7f12_3400_0000;
for (let i = 0; i < BATCH; i++) writeFaultMessage(msgs, i, GUEST_BASE + Math.floor(rnd() * 65536) * PAGE);
const faults = new Float64Array(BATCH);
const noRemove = () => {};

// ---- a handler table of 4 regions (guest RAM split around an MMIO hole, like Firecracker's) ----
const IMAGE = 1024 * 1024 * 1024;
const zero = ZeroMap.forSize(IMAGE);
for (let p = 0; p < zero.pages; p += 64) zero.setZeroRange(p, 16 + (p % 32)); // ~half zero, in runs
const backend: ImageBackend = { kind: "image", size: IMAGE, zero, base: 0, zeroBytesAreZero: true, description: "bench" };
const REGION = IMAGE / 4;
const table = new HandlerTable(
  Array.from({ length: 4 }, (_, i) => ({ base: GUEST_BASE + i * 2 * REGION, size: REGION, offset: i * REGION, pageSize: PAGE })),
  backend,
);
const sameRegion = Float64Array.from({ length: 1024 }, () => GUEST_BASE + Math.floor(rnd() * (REGION / PAGE)) * PAGE);
const anyRegion = Float64Array.from({ length: 1024 }, () => GUEST_BASE + Math.floor(rnd() * 4) * 2 * REGION + Math.floor(rnd() * (REGION / PAGE)) * PAGE);
const zeroQueries = Uint32Array.from({ length: 1024 }, () => Math.floor(rnd() * zero.pages));

let k = 0;
group("ffi", () => {
  bench("sl_abi_version()", () => do_not_optimize(sl.sl_abi_version()));
  bench("sl_uffd_wake(-1, addr, 4096) -> -EBADF", () => do_not_optimize(sl.sl_uffd_wake(-1, GUEST_BASE, PAGE)));
});
group("fault path, JS", () => {
  // The decoder VmSession.dispatch runs; random addresses are its sort's worst case.
  bench("decodeMessages: 64 uffd_msg, decoded and sorted", () => do_not_optimize(decodeMessages(msgs, BATCH, faults, noRemove)));
  bench("HandlerTable.find, same region (last-hit cache)", () => do_not_optimize(table.find(sameRegion[k++ & 1023]!)));
  bench("HandlerTable.find, random of 4 regions", () => do_not_optimize(table.find(anyRegion[k++ & 1023]!)));
  bench("ZeroMap.isZero, random page of 1 GiB", () => do_not_optimize(zero.isZero(zeroQueries[k++ & 1023]!)));
});

const res = await run({ colors: false, print: (s: string) => process.stderr.write(`${s}\n`) });
const summary: Record<string, { avg_ns: number; p50_ns: number; min_ns: number; p99_ns: number }> = {};
for (const b of res.benchmarks) {
  for (const r of b.runs) {
    if (!r.stats) throw new Error(`micro: ${r.name} failed: ${String(r.error)}`);
    summary[r.name] = { avg_ns: r.stats.avg, p50_ns: r.stats.p50, min_ns: r.stats.min, p99_ns: r.stats.p99 };
  }
}
msgs.free();
if (out) await Bun.write(out, JSON.stringify(summary, null, 2));
else process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`);
