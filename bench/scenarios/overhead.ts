// a. Per-fault overhead: plain-C `--strategy on_demand` vs `snapload serve --fault-around 1`,
// one 4 KiB page per fault, every page of a random-data image, sequential and random order,
// same-CPU and cross-CPU placement. Figure: the guest's touch_ns; target snapload/plain <= 1.05.
import { check, type Ctx, fmtTime, type Row, type Scenario, summarize } from "../common.ts";
import { CROSS_CPU, LongLivedHandler, type Measured, SAME_CPU } from "../runs.ts";

const TARGET = 1.05;

export const overhead: Scenario = async (ctx: Ctx) => {
  const mib = ctx.opts.quick ? 64 : 256;
  const img = ctx.image(mib);
  const rows: Row[] = [];
  const data: Record<string, unknown> = { imageMiB: mib, target: TARGET, cases: [] as unknown[] };
  const cases = data.cases as unknown[];
  for (const at of [SAME_CPU, CROSS_CPU]) {
    for (const order of ["seq", "random"]) {
      const guest = ["--order", order, "--seed", "1"];
      const plain: Measured[] = [];
      const snap: Measured[] = [];
      // Both handlers live across the runs (as a daemon does) and serve one discarded guest first.
      const plainH = await LongLivedHandler.plain(ctx, img, ["--strategy", "on_demand"], at, ctx.opts.runs + 1);
      const snapH = await LongLivedHandler.snapload(ctx, img, ["--fault-around", "1"], at);
      try {
        await plainH.warmUp(guest);
        await snapH.warmUp(guest);
        for (let r = 0; r < ctx.opts.runs; r++) {
          // Alternate who goes first so slow drift (page cache, host noise) hits both equally.
          const doPlain = async () => plain.push({ report: await plainH.run(guest), handler: {} });
          const doSnap = async () => snap.push({ report: await snapH.run(guest), handler: {} });
          if (r % 2 === 0) {
            await doPlain();
            await doSnap();
          } else {
            await doSnap();
            await doPlain();
          }
          ctx.log(`a ${at.name} ${order} run ${r + 1}: plain ${fmtTime(plain.at(-1)!.report.touch_ns)}, snapload ${fmtTime(snap.at(-1)!.report.touch_ns)}`);
        }
      } finally {
        const pf = await plainH.stop().catch(() => []);
        const sf = await snapH.stop().catch(() => []);
        if (plain[0] && pf[0]) plain[0].handler = pf[0];
        if (snap[0] && sf[1]) snap[0].handler = sf[1];
      }
      const p = summarize(plain.map((m) => m.report.touch_ns));
      const s = summarize(snap.map((m) => m.report.touch_ns));
      const ratio = s.median / p.median;
      const ratioBest = s.min / p.min;
      const pages = plain[0]!.report.pages;
      cases.push({
        placement: at.name,
        handlerCpu: at.handler,
        guestCpu: at.guest,
        order,
        pages,
        plainTouchNs: p,
        snaploadTouchNs: s,
        plainFaults: plain[0]!.handler.faults,
        snaploadFaults: snap[0]!.handler.faults,
        plainP50Ns: summarize(plain.map((m) => m.report.lat_p50_ns)).median,
        snaploadP50Ns: summarize(snap.map((m) => m.report.lat_p50_ns)).median,
        ratioMedian: ratio,
        ratioBest,
      });
      const label = `${order}, ${at.name} (handler cpu ${at.handler}, guest cpu ${at.guest})`;
      rows.push({
        what: `${label}: plain-C on_demand`,
        median: fmtTime(p.median),
        best: fmtTime(p.min),
        result: `${fmtTime(p.median / pages)}/page`,
      });
      rows.push({
        what: `${label}: snapload --fault-around 1`,
        median: fmtTime(s.median),
        best: fmtTime(s.min),
        result: `**${ratio.toFixed(2)}x** plain (best ${ratioBest.toFixed(2)}x); ${fmtTime(s.median / pages)}/page`,
        target: `≤ ${TARGET} ${check(ratio <= TARGET)}`,
      });
    }
  }
  return {
    id: "a",
    title: `overhead: one page per fault, ${mib} MiB random image, all pages`,
    status: "ok",
    notes: [],
    rows,
    data,
  };
};
