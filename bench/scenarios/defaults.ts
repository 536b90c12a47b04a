// g. Defaults on every core layout (issue 10 §1–3): snapload with default options vs the plain-C
// on_demand handler, one page per fault, 32 MiB random image, sequential touches, same-CPU and
// cross-CPU placement, paired interleaved runs. Reports the ratio of medians and the worst run, the
// CPU the daemon burns per second of restore and while idle, and the first restore after daemon
// start vs the tenth (over several fresh daemons).
import { readdirSync, readFileSync } from "node:fs";
import { check, type Ctx, fmtTime, type Row, type Scenario, summarize } from "../common.ts";
import { CROSS_CPU, LongLivedHandler, type Placement, SAME_CPU } from "../runs.ts";

const SAME_TARGET = 1.03;
const CROSS_TARGET = 0.45;
const FIRST_TARGET = 1.05;
/** An idle daemon may wake up to check its timers, but not spin: CPU-seconds per second. */
const IDLE_TARGET = 0.005;
const SERVE = ["--fault-around", "1", "--populate", "none"];

/** CPU time (ns) of every thread of pid, from schedstat (precise, unlike /proc/pid/stat's ticks). */
function cpuNs(pid: number): number {
  let sum = 0;
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    try {
      sum += Number(readFileSync(`/proc/${pid}/task/${t}/schedstat`, "utf8").split(" ")[0]);
    } catch {
      // the thread exited meanwhile
    }
  }
  return sum;
}

async function idleCpu(pid: number, ms = 1000): Promise<number> {
  const c0 = cpuNs(pid);
  const t0 = performance.now();
  await Bun.sleep(ms);
  return (cpuNs(pid) - c0) / ((performance.now() - t0) * 1e6);
}

interface LayoutResult {
  placement: string;
  plainNs: number[];
  snapNs: number[];
  spin0Ns: number[];
  ratioMedian: number;
  ratioWorst: number;
  spin0Ratio: number;
  daemonCpuPerSec: number;
  idleCpuPerSec: number;
}

async function layout(ctx: Ctx, img: string, at: Placement, runs: number): Promise<LayoutResult> {
  const guest = ["--order", "seq"];
  const plainH = await LongLivedHandler.plain(ctx, img, ["--strategy", "on_demand"], at, runs + 1);
  const snapH = await LongLivedHandler.snapload(ctx, img, SERVE, at);
  const spin0H = await LongLivedHandler.snapload(ctx, img, [...SERVE, "--spin-us", "0"], at);
  const plainNs: number[] = [];
  const snapNs: number[] = [];
  const spin0Ns: number[] = [];
  let cpu = 0;
  let wall = 0;
  let idle = 0;
  try {
    await plainH.warmUp(guest);
    await snapH.warmUp(guest);
    await spin0H.warmUp(guest);
    idle = await idleCpu(snapH.pid);
    for (let r = 0; r < runs; r++) {
      const order = [
        async () => plainNs.push((await plainH.run(guest)).touch_ns),
        async () => {
          const c0 = cpuNs(snapH.pid);
          const t0 = performance.now();
          snapNs.push((await snapH.run(guest)).touch_ns);
          cpu += cpuNs(snapH.pid) - c0;
          wall += (performance.now() - t0) * 1e6;
        },
        async () => spin0Ns.push((await spin0H.run(guest)).touch_ns),
      ];
      // Rotate who goes first so drift hits every contender alike.
      for (let k = 0; k < order.length; k++) await order[(r + k) % order.length]!();
      ctx.log(`g ${at.name} run ${r + 1}: plain ${fmtTime(plainNs.at(-1)!)}, snapload ${fmtTime(snapNs.at(-1)!)} (${(snapNs.at(-1)! / plainNs.at(-1)!).toFixed(2)}x), --spin-us 0 ${fmtTime(spin0Ns.at(-1)!)}`);
    }
  } finally {
    await plainH.stop().catch(() => []);
    await snapH.stop().catch(() => []);
    await spin0H.stop().catch(() => []);
  }
  const p = summarize(plainNs).median;
  return {
    placement: at.name,
    plainNs,
    snapNs,
    spin0Ns,
    ratioMedian: summarize(snapNs).median / p,
    // Paired runs: the worst of each run's own ratio.
    ratioWorst: Math.max(...snapNs.map((s, i) => s / plainNs[i]!)),
    spin0Ratio: summarize(spin0Ns).median / p,
    daemonCpuPerSec: cpu / wall,
    idleCpuPerSec: idle,
  };
}

/** First and tenth restore on each of `daemons` fresh daemons (same CPU layout as production: cross). */
async function firstVsTenth(ctx: Ctx, img: string, daemons: number): Promise<{ first: number[]; tenth: number[] }> {
  const first: number[] = [];
  const tenth: number[] = [];
  for (let d = 0; d < daemons; d++) {
    const h = await LongLivedHandler.snapload(ctx, img, SERVE, CROSS_CPU);
    try {
      for (let i = 1; i <= 10; i++) {
        const ns = (await h.run(["--order", "seq"])).touch_ns;
        if (i === 1) first.push(ns);
        if (i === 10) tenth.push(ns);
      }
    } finally {
      await h.stop().catch(() => []);
    }
    ctx.log(`g daemon ${d + 1}: first restore ${fmtTime(first.at(-1)!)}, tenth ${fmtTime(tenth.at(-1)!)}`);
  }
  return { first, tenth };
}

export const defaults: Scenario = async (ctx: Ctx) => {
  const mib = 32;
  const runs = ctx.opts.quick ? 3 : 9;
  const img = ctx.image(mib);
  const rows: Row[] = [];
  const layouts: LayoutResult[] = [];
  for (const at of [SAME_CPU, CROSS_CPU]) {
    const r = await layout(ctx, img, at, runs);
    layouts.push(r);
    const target = at === SAME_CPU ? SAME_TARGET : CROSS_TARGET;
    const label = `${at.name} (handler cpu ${at.handler}, guest cpu ${at.guest})`;
    rows.push({ what: `${label}: plain-C on_demand`, median: fmtTime(summarize(r.plainNs).median), best: fmtTime(summarize(r.plainNs).min) });
    rows.push({
      what: `${label}: snapload defaults`,
      median: fmtTime(summarize(r.snapNs).median),
      best: fmtTime(summarize(r.snapNs).min),
      result: `**${r.ratioMedian.toFixed(2)}x** plain (worst run ${r.ratioWorst.toFixed(2)}x); daemon ${r.daemonCpuPerSec.toFixed(2)} CPU-s/s restoring, ${(r.idleCpuPerSec * 1000).toFixed(1)} CPU-ms/s idle`,
      target: at === SAME_CPU ? `every run ≤ ${target} ${check(r.ratioWorst <= target)}` : `≤ ${target} ${check(r.ratioMedian <= target)}`,
    });
    rows.push({
      what: `${label}: snapload --spin-us 0`,
      median: fmtTime(summarize(r.spin0Ns).median),
      best: fmtTime(summarize(r.spin0Ns).min),
      result: `${r.spin0Ratio.toFixed(2)}x plain`,
    });
  }
  const idleWorst = Math.max(...layouts.map((l) => l.idleCpuPerSec));
  rows.push({
    what: "idle daemon (after a restore, no VM): CPU burned",
    result: `${(idleWorst * 1000).toFixed(1)} CPU-ms/s`,
    target: `< ${IDLE_TARGET * 1000} CPU-ms/s ${check(idleWorst < IDLE_TARGET)}`,
  });
  const ft = await firstVsTenth(ctx, img, ctx.opts.quick ? 2 : 4);
  const f = summarize(ft.first).median;
  const t = summarize(ft.tenth).median;
  rows.push({
    what: `first restore after daemon start vs the tenth (cross CPU, ${ft.first.length} fresh daemons)`,
    median: `${fmtTime(f)} vs ${fmtTime(t)}`,
    result: `**${(f / t).toFixed(2)}x**`,
    target: `≤ ${FIRST_TARGET} ${check(f / t <= FIRST_TARGET)}`,
  });
  return {
    id: "g",
    title: `defaults on every core layout: ${mib} MiB random image, one page per fault, sequential, ${runs} paired runs`,
    status: "ok",
    notes: [],
    rows,
    data: { imageMiB: mib, runs, layouts, firstVsTenth: ft },
  };
};
