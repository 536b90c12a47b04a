// e. Scale: 1, 4 and 8 VMs at once on one daemon, each its own stand-in restoring its own region
// of one image (random order, one page per fault), all pinned to CPU 0. Aggregate pages/s =
// all pages / the longest guest touch phase. Daemon memory from /proc/PID/status: VmHWM (peak
// RSS), and the sampled peaks of RssAnon (our heap) and RssFile (the image's page cache mapped
// into us). RssAnon must not grow with the image: 8 VMs on a small and a large image show it.
import { check, type Ctx, fmtCount, fmtKiB, MiB, type Row, type Scenario, summarize } from "../common.ts";
import { SAME_CPU, snaploadMany, warmUp } from "../runs.ts";

interface Config {
  imageMiB: number;
  vms: number;
}

export const scale: Scenario = async (ctx: Ctx) => {
  const q = ctx.opts.quick;
  const regionMiB = q ? 16 : 64;
  const mainMiB = q ? 128 : 512;
  const [smallMiB, largeMiB] = q ? [64, 256] : [256, 1024];
  const configs: Config[] = [
    { imageMiB: mainMiB, vms: 1 },
    { imageMiB: mainMiB, vms: 4 },
    { imageMiB: mainMiB, vms: 8 },
    { imageMiB: smallMiB, vms: 8 },
    { imageMiB: largeMiB, vms: 8 },
  ];
  const at = SAME_CPU;
  const rows: Row[] = [];
  const results: unknown[] = [];
  const anonByImage = new Map<number, number>();
  for (const c of configs) {
    const img = ctx.image(c.imageMiB);
    const guests = Array.from({ length: c.vms }, (_, i) => {
      const offset = ((i * regionMiB) % c.imageMiB) * MiB;
      return ["--region", `${regionMiB * MiB}@${offset}`, "--order", "random", "--seed", String(i + 1)];
    });
    const agg: number[] = [];
    const hwm: number[] = [];
    const anon: number[] = [];
    const file: number[] = [];
    const idleAnon: number[] = [];
    const idleFile: number[] = [];
    await warmUp(ctx, `e ${c.vms} VM(s), ${c.imageMiB} MiB image`, [{ label: "snapload", run: () => snaploadMany(ctx, img, ["--fault-around", "1"], guests, at) }]);
    for (let r = 0; r < ctx.opts.runs; r++) {
      const m = await snaploadMany(ctx, img, ["--fault-around", "1"], guests, at);
      const pages = m.reports.reduce((n, x) => n + x.pages, 0);
      const longest = Math.max(...m.reports.map((x) => x.touch_ns));
      agg.push(pages / (longest / 1e9));
      hwm.push(m.mem.VmHWM);
      anon.push(m.mem.RssAnon);
      file.push(m.mem.RssFile);
      idleAnon.push(m.idle.RssAnon);
      idleFile.push(m.idle.RssFile);
      ctx.log(`e ${c.vms} VM(s), ${c.imageMiB} MiB image, run ${r + 1}: ${fmtCount(agg.at(-1)!)} pages/s, VmHWM ${fmtKiB(m.mem.VmHWM)}, RssAnon ${fmtKiB(m.mem.RssAnon)}, RssFile ${fmtKiB(m.mem.RssFile)}`);
    }
    const a = summarize(agg);
    const s = { hwm: summarize(hwm), anon: summarize(anon), file: summarize(file), idleAnon: summarize(idleAnon), idleFile: summarize(idleFile) };
    if (c.vms === 8) anonByImage.set(c.imageMiB, s.anon.median);
    results.push({ ...c, regionMiB, pagesPerSec: a, VmHWMKiB: s.hwm, RssAnonPeakKiB: s.anon, RssFilePeakKiB: s.file, RssAnonIdleKiB: s.idleAnon, RssFileIdleKiB: s.idleFile });
    rows.push({
      what: `${c.vms} VM${c.vms > 1 ? "s" : ""} × ${regionMiB} MiB of a ${c.imageMiB} MiB image: aggregate pages/s`,
      median: fmtCount(a.median),
      best: fmtCount(a.max),
      result: `VmHWM ${fmtKiB(s.hwm.median)}; peak RssAnon ${fmtKiB(s.anon.median)} (idle ${fmtKiB(s.idleAnon.median)}), RssFile ${fmtKiB(s.file.median)} (idle ${fmtKiB(s.idleFile.median)})`,
    });
  }
  const small = anonByImage.get(smallMiB)!;
  const large = anonByImage.get(largeMiB)!;
  const growth = large - small;
  // Allow noise (GC timing): a few MiB, or 10%.
  const flat = growth <= Math.max(4 * 1024, small * 0.1);
  rows.push({
    what: `daemon RssAnon, 8 VMs, ${smallMiB} MiB → ${largeMiB} MiB image`,
    result: `${fmtKiB(small)} → ${fmtKiB(large)} (${growth >= 0 ? "+" : ""}${fmtKiB(growth)})`,
    target: `flat ${check(flat)}`,
  });
  return {
    id: "e",
    title: `scale: VMs on one daemon, ${regionMiB} MiB regions, random order, fault-around 1, all on cpu 0`,
    status: "ok",
    notes: [],
    rows,
    data: { configs: results, rssAnonGrowthKiB: growth, rssAnonFlat: flat },
  };
};
