// q. QEMU: a real Linux guest (TCG) with ≥ 1 GiB of non-zero RAM, restored from one mapped-ram
// snapshot two ways into a fresh, unmodified QEMU: QEMU's own eager `migrate-incoming file:` with
// mapped-ram (every page read before the guest runs), and `snapload qemu-restore` (postcopy:
// the guest runs after the device state, RAM follows). Figures: time to guest running and time to
// completion, ratios against the eager load; request latency with and without preempt. The
// restore runs the single binary (dist/snapload, built here), which is what users run; where its
// time to running goes and the CPU each side spends streaming are rows of their own.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { EVENTS_CAPABILITY, waitMigrationState } from "../../src/sinks/qemu/migration-status.ts";
import { QmpClient } from "../../src/sinks/qemu/qmp.ts";
import { QemuProc, buildInitramfs, debianKernel, guestArgs, qemuMissing } from "../../test/qemu-guest.ts";
import { check, type Ctx, fmtTime, type Row, type Scenario, summarize } from "../common.ts";
import { BUN, MAIN, ROOT } from "../procs.ts";

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
  /** Time to running, split (ms): process start-up, then snapload's own steps, then QEMU loading the device state. */
  split: { startup: number; parse: number; qmp: number; incoming: number; send: number; load: number } | null;
  /** CPU time (ms) over the whole restore: snapload, and QEMU's threads by name (-name debug-threads=on). */
  cpu: { snapload: number; qemu: Record<string, number> };
}

/** CPU ms of each thread of a process, keyed name#tid (/proc/PID/task/TID/stat utime+stime). */
function threadCpu(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  const hz = 100; // USER_HZ
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tids) {
    try {
      const st = readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
      const f = st.slice(st.lastIndexOf(")") + 2).split(" ");
      out.set(`${st.slice(st.indexOf("(") + 1, st.lastIndexOf(")"))}#${tid}`, ((Number(f[11]) + Number(f[12])) * 1000) / hz);
    } catch {
      // the thread ended between readdir and read: its last sample stands
    }
  }
  return out;
}

/** Builds dist/snapload (bytecode, C core embedded); undefined when it cannot be built here. */
function buildBinary(log: (s: string) => void): string | undefined {
  const r = Bun.spawnSync([BUN, join(ROOT, "scripts", "build-binary.ts")], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  const exe = join(ROOT, "dist", "snapload");
  if (r.exitCode === 0 && existsSync(exe)) return exe;
  log(`q: dist/snapload could not be built (${r.stderr.toString().trim().split("\n").at(-1)}); timing bun src/main.ts instead`);
  return undefined;
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
  // debug-threads: QEMU names its threads (CPU 0/TCG, mig/dst/listen, ...) for the CPU rows.
  const args = (qmp: string, extra: string[] = []) => guestArgs({ kernel: kernel.path, initrd, memMiB, qmp, append: `fill_mib=${fillMiB}`, extra: ["-name", "q,debug-threads=on", ...extra] });
  const exe = buildBinary(ctx.log);
  const SNAPLOAD = exe ? [exe] : [BUN, MAIN];

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
      const caps: { capability: string; state: boolean }[] = [{ capability: "mapped-ram", state: true }, EVENTS_CAPABILITY];
      if (multifd > 0) {
        // QEMU reads the file with that many threads (mapped-ram + multifd, QEMU >= 9.0).
        caps.push({ capability: "multifd", state: true });
        await q.execute("migrate-set-parameters", { "multifd-channels": multifd });
      }
      await q.execute("migrate-set-capabilities", { capabilities: caps });
      const t0 = performance.now();
      await q.execute("migrate-incoming", { uri: `file:${snapshot}` });
      // The end of the load is QEMU's MIGRATION event (no poll interval in the figure).
      const m = await waitMigrationState(q, ["completed", "failed"], 120_000);
      if (m.status === "failed") throw new Error(`eager load failed: ${m["error-desc"]}`);
      if (m.timedOut) throw new Error(`eager load still ${m.status} after 120 s`);
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
      // QEMU's threads come and go (the listen thread ends at completion): keep each one's last sample.
      const qemuSeen = threadCpu(dst.proc.pid);
      const qemuAt0 = new Map(qemuSeen);
      const sample = () => {
        for (const [k, v] of threadCpu(dst.proc.pid)) qemuSeen.set(k, v);
      };
      const sampler = setInterval(sample, 50);
      const t0 = performance.now();
      const p = Bun.spawn([...SNAPLOAD, "qemu-restore", "--mem", snapshot, "--qmp", dst.qmpPath, "--json", ...(preempt ? [] : ["--no-preempt"])], { stdout: "pipe", stderr: "pipe" });
      const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
      const wall = performance.now() - t0;
      clearInterval(sampler);
      sample();
      if (code !== 0) throw new Error(`qemu-restore failed: ${err}`);
      const s = JSON.parse(out);
      const qemu: Record<string, number> = {};
      for (const [k, v] of qemuSeen) {
        const name = k.slice(0, k.lastIndexOf("#"));
        qemu[name] = (qemu[name] ?? 0) + v - (qemuAt0.get(k) ?? 0);
      }
      // snapload's clock starts after Bun has loaded it: add that start-up to be fair.
      const startup = wall - s.timeToCompletionMs;
      const st = s.steps;
      const split =
        s.timeToRunningMs === null || st?.incomingMs == null
          ? null
          : { startup, parse: st.parsedMs, qmp: st.checkedMs - st.parsedMs, incoming: st.incomingMs - st.checkedMs, send: s.timeToPackageMs - st.incomingMs, load: s.timeToRunningMs - s.timeToPackageMs };
      const snaploadCpu = Number(p.resourceUsage()?.cpuTime.total ?? 0) / 1000;
      return { runningMs: s.timeToRunningMs + startup, ownRunningMs: s.timeToRunningMs, completedMs: wall, p50: s.latencyP50Ms, p99: s.latencyP99Ms, requests: s.requests, split, cpu: { snapload: snaploadCpu, qemu } };
    } finally {
      await dst.kill();
    }
  };

  /** Start-up alone: a restore of a missing file loads the qemu-restore path and fails at once. */
  const startup = (cmd: string[]) => {
    const t0 = performance.now();
    const p = Bun.spawnSync([...cmd, "qemu-restore", "--mem", join(ctx.dir, "missing.snap"), "--to", "unix:/nonexistent"], { stdout: "ignore", stderr: "ignore" });
    return { ms: performance.now() - t0, cpu: Number(p.resourceUsage?.cpuTime.total ?? 0) / 1000 };
  };

  const runs = Math.min(ctx.opts.runs, 3);
  const E: Eager[] = [];
  const EM: Eager[] = [];
  const MULTIFD = 2; // this host's core count; more channels only queue
  const L: Lazy[] = [];
  const LN: Lazy[] = [];
  await eager(); // page cache warm for both
  const SB: { ms: number; cpu: number }[] = [];
  const SM: { ms: number; cpu: number }[] = [];
  for (let r = 0; r < 5; r++) {
    // Alternated, so both see the same neighbours on this shared machine.
    if (exe) SB.push(startup([exe]));
    SM.push(startup([BUN, MAIN]));
  }
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
    ...splitRows(L),
    { what: "snapload qemu-restore: time to completion (preempt)", median: ms(lc.median), best: ms(lc.min), result: `**${compRatio.toFixed(2)}x** the faster eager load`, target: `≤ ${COMPLETION_TARGET}x ${check(compRatio <= COMPLETION_TARGET)}` },
    { what: "request latency p50 / p99, preempt (request read → page handed to the socket)", median: `${ms(lat(L, "p50").median)} / ${ms(lat(L, "p99").median)}` },
    { what: "request latency p50 / p99, no preempt (behind background sections)", median: `${ms(lat(LN, "p50").median)} / ${ms(lat(LN, "p99").median)}` },
  ];
  const sb = summarize(SB.map((x) => x.ms));
  const sm = summarize(SM.map((x) => x.ms));
  const cpuMed = (xs: number[]) => summarize(xs).median.toFixed(0);
  rows.push(
    {
      what: `start-up to the command's first step (qemu-restore of a missing file, ${SM.length} runs each): ${exe ? "dist/snapload (what users run, bytecode) vs " : ""}bun src/main.ts`,
      median: exe ? `${ms(sb.median)} vs ${ms(sm.median)}` : ms(sm.median),
      best: exe ? `${ms(sb.min)} vs ${ms(sm.min)}` : ms(sm.min),
      result: `CPU ${exe ? `${cpuMed(SB.map((x) => x.cpu))} vs ` : ""}${cpuMed(SM.map((x) => x.cpu))} ms`,
    },
    ...cpuRows(L, lc.median),
  );
  return {
    id: "q",
    title: "QEMU restore",
    status: "ok",
    notes: [
      "TCG guest (no KVM here); the eager figure is QEMU reading every page with pread before the guest runs",
      `snapload runs as ${exe ? "dist/snapload (the single binary users run)" : "bun src/main.ts (the binary could not be built)"}`,
    ],
    rows,
    data: { memMiB, fillMiB, binary: exe !== undefined, eager: E, eagerMultifd: EM, multifdChannels: MULTIFD, preempt: L, noPreempt: LN, startupBinary: SB, startupBun: SM },
  };
};

/** The time to running of the preempt runs, step by step (medians of each step). */
function splitRows(L: Lazy[]): Row[] {
  const xs = L.flatMap((x) => (x.split ? [x.split] : []));
  if (xs.length === 0) return [];
  const m = (k: keyof NonNullable<Lazy["split"]>) => fmtTime(summarize(xs.map((x) => x[k])).median * 1e6);
  return [
    { what: "… time to running, split: process start-up (exec, Bun, module loading; and exit)", median: m("startup") },
    { what: "… snapshot parsed (header, device state located and read; QMP connects meanwhile)", median: m("parse") },
    { what: "… QMP connected and the destination checked (one pipelined round trip)", median: m("qmp") },
    { what: "… capabilities set, migrate-incoming", median: m("incoming") },
    { what: "… migration socket, handshake (PING/PONG), preempt channel, device state sent", median: m("send") },
    { what: "… QEMU loads the device state until query-status says running (2 ms polls)", median: m("load") },
  ];
}

/** Where the CPU goes during a restore (preempt runs): snapload, and QEMU's receiving and vCPU threads. */
function cpuRows(L: Lazy[], completedMs: number): Row[] {
  if (L.length === 0) return [];
  const med = (f: (x: Lazy) => number) => summarize(L.map(f)).median;
  const names = [...new Set(L.flatMap((x) => Object.keys(x.cpu.qemu)))];
  const q = (n: string) => med((x) => x.cpu.qemu[n] ?? 0);
  const listen = q("mig/dst/listen");
  const vcpu = names.filter((n) => n.startsWith("CPU ")).reduce((a, n) => a + q(n), 0);
  const other = names.filter((n) => n !== "mig/dst/listen" && !n.startsWith("CPU ")).reduce((a, n) => a + q(n), 0);
  const pct = (v: number) => `${((100 * v) / completedMs).toFixed(0)}% of the time to completion`;
  const snap = med((x) => x.cpu.snapload);
  return [
    { what: "CPU during the restore: snapload (all threads, user+sys)", median: fmtTime(snap * 1e6), result: pct(snap) },
    { what: "CPU during the restore: QEMU's postcopy receiver (mig/dst/listen: reads the stream, places each page)", median: fmtTime(listen * 1e6), result: pct(listen) },
    { what: "CPU during the restore: QEMU's vCPU (TCG) / other QEMU threads", median: `${fmtTime(vcpu * 1e6)} / ${fmtTime(other * 1e6)}` },
  ];
}
