// h. Fairness with many VMs (issue 10 §6): a VM with a small working set (random touches of a
// 4 MiB region) restores while 7 others do full sequential restores on the same daemon, default
// options. The daemon and the small VM share cpu 0, the 7 run on cpu 1: the small VM's latency is
// then the daemon's queueing, not a crowded vCPU run queue. Figure: the small VM's fault latency
// p99 (as its vCPU sees it) beside the 7 vs alone; target ≤ 3x.
import { check, type Ctx, fmtTime, MiB, type Row, type Scenario, summarize } from "../common.ts";
import { finishStandin, startSnapload, startStandin, stopSnapload } from "../procs.ts";
import type { StandinReport } from "../procs.ts";

const TARGET = 3;
/** Defaults (population would install the small VM's pages before it touches them). */
const SERVE: string[] = [];

async function restore(ctx: Ctx, img: string, heavy: string[][], small: string[]): Promise<StandinReport> {
  const sock = ctx.socket("h");
  const d = await startSnapload(sock, ["--mem", img, ...SERVE], 0);
  try {
    const heavyProcs = heavy.map((g) => startStandin(sock, ["--expect", img, ...g], 1));
    const smallProc = startStandin(sock, ["--expect", img, ...small], 0);
    const [report] = await Promise.all([finishStandin(smallProc), ...heavyProcs.map((p) => finishStandin(p))]);
    await stopSnapload(d);
    return report;
  } finally {
    d.kill("SIGKILL");
  }
}

export const fairness: Scenario = async (ctx: Ctx) => {
  const heavyMiB = ctx.opts.quick ? 32 : 64;
  const img = ctx.image(8 * heavyMiB);
  const heavy = Array.from({ length: 7 }, (_, i) => ["--region", `${heavyMiB * MiB}@${(i + 1) * heavyMiB * MiB}`, "--order", "seq"]);
  const small = ["--region", `${4 * MiB}@0`, "--order", "random", "--seed", "7"];
  const alone: number[] = [];
  const loaded: number[] = [];
  await restore(ctx, img, [], small); // warm-up, discarded
  for (let r = 0; r < ctx.opts.runs; r++) {
    alone.push((await restore(ctx, img, [], small)).lat_p99_ns);
    loaded.push((await restore(ctx, img, heavy, small)).lat_p99_ns);
    ctx.log(`h run ${r + 1}: small VM fault p99 alone ${fmtTime(alone.at(-1)!)}, beside 7 full restores ${fmtTime(loaded.at(-1)!)}`);
  }
  const a = summarize(alone);
  const l = summarize(loaded);
  const ratio = l.median / a.median;
  const rows: Row[] = [
    { what: "small VM (4 MiB, random) alone: fault p99", median: fmtTime(a.median), best: fmtTime(a.min) },
    {
      what: `small VM beside 7 VMs restoring ${heavyMiB} MiB each (sequential): fault p99`,
      median: fmtTime(l.median),
      best: fmtTime(l.min),
      result: `**${ratio.toFixed(2)}x** alone`,
      target: `≤ ${TARGET} ${check(ratio <= TARGET)}`,
    },
  ];
  return {
    id: "h",
    title: "fairness: one small restore beside 7 full ones on one daemon (daemon and small VM cpu 0, the 7 cpu 1)",
    status: "ok",
    notes: [],
    rows,
    data: { heavyMiB, aloneP99Ns: a, loadedP99Ns: l, ratio },
  };
};
