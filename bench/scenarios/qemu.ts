// q. QEMU: a real Linux guest (TCG) with ≥ 1 GiB of non-zero RAM, restored from one mapped-ram
// snapshot two ways into a fresh, unmodified QEMU: QEMU's own eager `migrate-incoming file:` with
// mapped-ram (every page read before the guest runs), and `snapload qemu-restore` (postcopy:
// the guest runs after the device state, RAM follows). Figures: time to guest running and time to
// completion, ratios against the eager load; request latency with and without preempt.
import { join } from "node:path";
import { QmpClient } from "../../src/sinks/qemu/qmp.ts";
import { QemuProc, buildInitramfs, debianKernel, guestArgs, qemuMissing } from "../../test/qemu-guest.ts";
import { check, type Ctx, fmtTime, type Row, type Scenario, summarize } from "../common.ts";
import { BUN, MAIN } from "../procs.ts";

const RUNNING_TARGET = 0.1;
const COMPLETION_TARGET = 1.25;

interface Eager {
  runningMs: number;
  completedMs: number;
}

interface Lazy {
  runningMs: number;
  /** From snapload's own clock: command start (after Bun has loaded it) to guest running. */
  ownRunningMs: number;
  completedMs: number;
  p50: number | null;
  p99: number | null;
  requests: number;
}

export const qemu: Scenario = async (ctx: Ctx) => {
  const skip = (why: string) => ({ id: "q", title: "QEMU restore", status: "skipped" as const, notes: [why], rows: [{ what: "snapload qemu-restore vs QEMU eager load", result: `skipped: ${why}` }], data: { skipped: why } });
  const missing = qemuMissing();
  if (missing) return skip(missing);
  const kernel = debianKernel();
  if ("error" in kernel) return skip(kernel.error);
  const fillMiB = ctx.opts.quick ? 256 : 1024;
  const memMiB = fillMiB + 384;
  const initrd = buildInitramfs(ctx.dir);
  const args = (qmp: string, extra: string[] = []) => guestArgs({ kernel: kernel.path, initrd, memMiB, qmp, append: `fill_mib=${fillMiB}`, extra });

  // One snapshot, taken after the guest has filled its RAM.
  const srcQmp = join(ctx.dir, "qemu-src.qmp");
  const src = new QemuProc(args(srcQmp), srcQmp);
  const snapshot = join(ctx.dir, "qemu.snap");
  try {
    await src.waitSerial(/SUM [0-9a-f]{32}/, 600_000);
    const save = Bun.spawnSync([BUN, MAIN, "qemu-save", "--qmp", srcQmp, "--out", snapshot, "--json"], { stdout: "pipe", stderr: "pipe" });
    if (save.exitCode !== 0) throw new Error(`qemu-save failed: ${save.stderr.toString()}`);
    const rep = JSON.parse(save.stdout.toString());
    ctx.log(`q: snapshot of a ${memMiB} MiB guest (${fillMiB} MiB filled): ${(rep.allocatedBytes / 2 ** 20).toFixed(0)} MiB on disk, saved in ${(rep.timeMs / 1000).toFixed(1)} s`);
  } finally {
    await src.kill();
  }

  let n = 0;
  const fresh = async (): Promise<QemuProc> => {
    const qmp = join(ctx.dir, `qemu-dst-${n++}.qmp`);
    const p = new QemuProc(args(qmp, ["-incoming", "defer"]), qmp);
    (await p.qmp()).close();
    return p;
  };

  const eager = async (multifd = 0): Promise<Eager> => {
    const dst = await fresh();
    const q = await QmpClient.connect(dst.qmpPath);
    try {
      const caps = [{ capability: "mapped-ram", state: true }];
      if (multifd > 0) {
        // QEMU reads the file with that many threads (mapped-ram + multifd, QEMU >= 9.0).
        caps.push({ capability: "multifd", state: true });
        await q.execute("migrate-set-parameters", { "multifd-channels": multifd });
      }
      await q.execute("migrate-set-capabilities", { capabilities: caps });
      const t0 = performance.now();
      await q.execute("migrate-incoming", { uri: `file:${snapshot}` });
      for (;;) {
        const m = await q.execute<{ status: string; "error-desc"?: string }>("query-migrate");
        if (m.status === "completed") break;
        if (m.status === "failed") throw new Error(`eager load failed: ${m["error-desc"]}`);
        await Bun.sleep(2);
      }
      // The snapshot was taken stopped, so the precopy load leaves the guest paused: start it.
      await q.execute("cont");
      const st = await q.execute<{ status: string }>("query-status");
      if (st.status !== "running") throw new Error(`eager load: guest ${st.status} after cont`);
      const runningMs = performance.now() - t0;
      // The eager load completes before the guest runs: both figures are the same instant.
      return { runningMs, completedMs: runningMs };
    } finally {
      q.close();
      await dst.kill();
    }
  };

  const lazy = async (preempt: boolean): Promise<Lazy> => {
    const dst = await fresh();
    try {
      const t0 = performance.now();
      const p = Bun.spawn([BUN, MAIN, "qemu-restore", "--mem", snapshot, "--qmp", dst.qmpPath, "--json", ...(preempt ? [] : ["--no-preempt"])], { stdout: "pipe", stderr: "pipe" });
      const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
      const wall = performance.now() - t0;
      if (code !== 0) throw new Error(`qemu-restore failed: ${err}`);
      const s = JSON.parse(out);
      // snapload's clock starts after Bun has loaded it: add that start-up to be fair.
      const startup = wall - s.timeToCompletionMs;
      return { runningMs: s.timeToRunningMs + startup, ownRunningMs: s.timeToRunningMs, completedMs: wall, p50: s.latencyP50Ms, p99: s.latencyP99Ms, requests: s.requests };
    } finally {
      await dst.kill();
    }
  };

  const runs = Math.min(ctx.opts.runs, 3);
  const E: Eager[] = [];
  const EM: Eager[] = [];
  const MULTIFD = 2; // this host's core count; more channels only queue
  const L: Lazy[] = [];
  const LN: Lazy[] = [];
  await eager(); // page cache warm for both
  for (let r = 0; r < runs; r++) {
    E.push(await eager());
    EM.push(await eager(MULTIFD));
    L.push(await lazy(true));
    LN.push(await lazy(false));
    ctx.log(`q run ${r + 1}: eager ${E.at(-1)!.runningMs.toFixed(0)} ms (multifd ${EM.at(-1)!.runningMs.toFixed(0)} ms); snapload running ${L.at(-1)!.runningMs.toFixed(0)} ms, complete ${L.at(-1)!.completedMs.toFixed(0)} ms (no preempt: ${LN.at(-1)!.completedMs.toFixed(0)} ms)`);
  }
  const ms = (v: number) => fmtTime(v * 1e6);
  const e = summarize(E.map((x) => x.runningMs));
  const em = summarize(EM.map((x) => x.runningMs));
  const lr = summarize(L.map((x) => x.runningMs));
  const lc = summarize(L.map((x) => x.completedMs));
  const lo = summarize(L.map((x) => x.ownRunningMs));
  // Against QEMU's faster eager variant (with multifd it reads the file on several threads).
  const base = Math.min(e.median, em.median);
  const runRatio = lr.median / base;
  const compRatio = lc.median / base;
  const lat = (xs: Lazy[], k: "p50" | "p99") => summarize(xs.map((x) => x[k]).filter((v): v is number => v !== null));
  const rows: Row[] = [
    { what: `QEMU eager load (migrate-incoming file:, mapped-ram), ${memMiB} MiB guest, ${fillMiB} MiB non-zero: running = complete`, median: ms(e.median), best: ms(e.min) },
    { what: `QEMU eager load with multifd (${MULTIFD} channels)`, median: ms(em.median), best: ms(em.min), result: `${(em.median / e.median).toFixed(2)}x plain eager` },
    { what: "snapload qemu-restore: time to guest running (incl. snapload start-up)", median: ms(lr.median), best: ms(lr.min), result: `**${runRatio.toFixed(2)}x** the faster eager load`, target: `≤ ${RUNNING_TARGET}x ${check(runRatio <= RUNNING_TARGET)}` },
    { what: "… of which after Bun start-up (snapload's own clock: parse, QMP checks, device state, QEMU loads it)", median: ms(lo.median), best: ms(lo.min), result: `${(lo.median / base).toFixed(2)}x the faster eager load` },
    { what: "snapload qemu-restore: time to completion (preempt)", median: ms(lc.median), best: ms(lc.min), result: `**${compRatio.toFixed(2)}x** the faster eager load`, target: `≤ ${COMPLETION_TARGET}x ${check(compRatio <= COMPLETION_TARGET)}` },
    { what: "request latency p50 / p99, preempt (request read → page handed to the socket)", median: `${ms(lat(L, "p50").median)} / ${ms(lat(L, "p99").median)}` },
    { what: "request latency p50 / p99, no preempt (behind background sections)", median: `${ms(lat(LN, "p50").median)} / ${ms(lat(LN, "p99").median)}` },
  ];
  return {
    id: "q",
    title: "QEMU restore",
    status: "ok",
    notes: ["TCG guest (no KVM here); the eager figure is QEMU reading every page with pread before the guest runs"],
    rows,
    data: { memMiB, fillMiB, eager: E, eagerMultifd: EM, multifdChannels: MULTIFD, preempt: L, noPreempt: LN },
  };
};
