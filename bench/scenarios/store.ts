// g. Snapshots in object storage (issue 11): a real Ceph RGW on loopback (test/ceph-rgw.ts),
// a guest-like image (long zero stretches, text, sparse and random data).
//   restore, cold cache: the manifest's recorded working set (10%, runs of 32 pages) prefetched,
//     the guest touching that set in another random order — touch time vs the same restore from
//     the local raw file with --prefetch; bytes fetched vs the stored chunks the guest touched;
//   restore, warm cache (a new daemon, the cold run's --cache-dir): fault latency p50/p99, one
//     page per fault, the same pages without prefetch, vs the local raw file;
//   push: first push vs one plain PUT of the raw file (what `aws s3 cp` does) to the same RGW;
//     a second push of a near-identical snapshot (0.5% of pages rewritten) vs the first;
//   storage: 10 snapshots, each 0.5% of pages rewritten after the previous one, vs one;
//     compression ratio; decompression + SHA-256 throughput on one core.
// Placement: daemon and guest on CPU 0 (the gateway and Ceph run unpinned).
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chunkKey, decodeChunk, decodeManifest, manifestKey } from "../../src/sources/store/format.ts";
import { push } from "../../src/sources/store/push.ts";
import { encodeWorkingSet } from "../../src/scheduler/working-set.ts";
import { cephMissing, createBucket, type Rgw, startRgw } from "../../test/ceph-rgw.ts";
import { writeGuestLikeImage } from "../../test/store-helpers.ts";
import { check, clusteredSet, type Ctx, fmtRate, fmtTime, MiB, PAGE, prng, type Row, type Scenario, shuffle, summarize, writeOrder } from "../common.ts";
import { BenchError, BUN, MAIN, pinned, Proc, runStandin, startSnapload, stopSnapload } from "../procs.ts";
import { CROSS_CPU, SAME_CPU } from "../runs.ts";

const FRACTION = 0.1;
const CLUSTER = 32;

/**
 * Rewrites 0.5% of the pages (64 random bytes each), as a running guest does between snapshots:
 * `run` = 1 scatters them uniformly (the worst case for any chunking); a guest's dirty pages
 * cluster (stacks, slabs, page cache pages of one file), modelled by runs of 32 pages.
 */
function mutate(path: string, seed: number, run: number): void {
  const bytes = readFileSync(path);
  const rnd = prng(seed);
  const pages = bytes.length / PAGE;
  for (let i = 0; i < pages / 200 / run; i++) {
    const first = Math.floor(rnd() * (pages - run));
    for (let p = first; p < first + run; p++) for (let k = 0; k < 64; k++) bytes[p * PAGE + Math.floor(rnd() * PAGE)] = (rnd() * 256) | 0;
  }
  writeFileSync(path, bytes);
}

function dirBytes(dir: string): number {
  let n = 0;
  for (const e of readdirSync(dir, { withFileTypes: true, recursive: true })) if (e.isFile()) n += statSync(join(e.parentPath, e.name)).size;
  return n;
}

/** `snapload serve` with the gateway's credentials in its environment. */
async function startStoreDaemon(socket: string, env: Record<string, string>, args: string[], cpu: number): Promise<Proc> {
  const vars = Object.entries(env).map(([k, v]) => `${k}=${v}`);
  const p = new Proc("snapload serve", pinned(cpu, ["env", ...vars, BUN, MAIN, "serve", "--socket", socket, ...args]));
  try {
    await p.waitFor(/listening on/, "stderr", 30_000);
  } catch (e) {
    p.kill("SIGKILL");
    throw e;
  }
  return p;
}

export const store: Scenario = async (ctx: Ctx) => {
  const missing = cephMissing();
  if (missing !== undefined) {
    return { id: "s", title: "snapshots in object storage (Ceph RGW)", status: "skipped", notes: [missing], rows: [{ what: "store scenarios", result: "skipped: Ceph not installed" }], data: {} };
  }
  const mib = ctx.opts.quick ? 64 : 256;
  const size = mib * MiB;
  const pages = size / PAGE;
  const img = join(ctx.dir, `guest-${mib}.mem`);
  writeGuestLikeImage(img, size, 5);
  const set = clusteredSet(pages, Math.ceil(pages * FRACTION), CLUSTER, 0x57);
  const ws = join(ctx.dir, "store-ws.bin");
  await Bun.write(ws, encodeWorkingSet(set, size));
  const guestOrder = join(ctx.dir, "store-order.bin");
  await writeOrder(guestOrder, shuffle(set.slice(), 0x99));
  const rgw: Rgw = await startRgw();
  const envBefore = { ...process.env };
  Object.assign(process.env, rgw.env);
  const ep = ["--s3-endpoint", rgw.endpoint];
  try {
    createBucket(rgw, "bench");
    const ref = (name: string) => `s3://bench/${name}`;
    await push(img, ref("base/vm"), { s3Endpoint: rgw.endpoint, workingSet: ws });
    // The same chunks under a manifest without a working set: the warm run measures faults, not prefetch.
    await push(img, ref("base/vm-nows"), { s3Endpoint: rgw.endpoint });
    const client = new Bun.S3Client({ endpoint: rgw.endpoint, accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey, bucket: "bench", region: "us-east-1" });
    const m = decodeManifest(new Uint8Array(await client.file(`base/${manifestKey("vm")}`).arrayBuffer()), "bench");
    // Stored bytes of the distinct chunks holding a page the guest touches: the floor for any fetcher.
    const touchedChunks = new Set<string>();
    for (const p of set) {
      if (m.zero.isZero(p)) continue; // zero pages are never fetched
      const h = m.body.chunks[Math.floor((p * PAGE) / m.body.chunkSize)];
      if (h) touchedChunks.add(h);
    }
    let touchedStored = 0;
    for (const h of touchedChunks) touchedStored += m.body.stored[m.body.chunks.indexOf(h)]!;

    const t = { localCross: [] as number[], coldCross: [] as number[], local: [] as number[], cold: [] as number[], fetched: [] as number[], warmP50: [] as number[], warmP99: [] as number[], localP50: [] as number[], localP99: [] as number[] };
    // The warm restore touches what the cold one fetched (the working set), one page per fault.
    const lat = ["--order", `file:${guestOrder}`];
    for (let r = 0; r <= ctx.opts.runs; r++) {
      const keep = r > 0; // run 0 warms up (JIT, page cache, the gateway) and is discarded
      const cache = join(ctx.dir, `store-cache-${r}`);
      rmSync(cache, { recursive: true, force: true });
      // Local raw file, working set prefetched.
      {
        const sock = ctx.socket("gl");
        const d = await startSnapload(sock, ["--mem", img, "--prefetch", ws], SAME_CPU.handler);
        const rep = await runStandin(sock, ["--expect", img, "--order", `file:${guestOrder}`], SAME_CPU.guest);
        await stopSnapload(d);
        if (keep) t.local.push(rep.touch_ns);
      }
      // Cold cache from RGW, the manifest's working set prefetched; then the same with the guest
      // on the other CPU (the daemon's decoding no longer takes the guest's CPU), against the
      // local file in that placement too.
      for (const at of [SAME_CPU, CROSS_CPU]) {
        if (at === CROSS_CPU) {
          const sock = ctx.socket("glx");
          const d = await startSnapload(sock, ["--mem", img, "--prefetch", ws], at.handler);
          const rep = await runStandin(sock, ["--expect", img, "--order", `file:${guestOrder}`], at.guest);
          await stopSnapload(d);
          if (keep) t.localCross.push(rep.touch_ns);
          rmSync(cache, { recursive: true, force: true });
        }
        const sock = ctx.socket("gc");
        const d = await startStoreDaemon(sock, rgw.env, ["--mem", ref("base/vm"), ...ep, "--cache-dir", cache], at.handler);
        const rep = await runStandin(sock, ["--expect", img, "--order", `file:${guestOrder}`], at.guest);
        await stopSnapload(d);
        const g = d.stderr.match(/: (\d+) GETs \(([\d.]+) (MiB|KiB|B)\)/);
        if (!g) throw new BenchError(`no GET figures in the daemon's log\n${d.tail()}`);
        const bytes = Number(g[2]) * (g[3] === "MiB" ? MiB : g[3] === "KiB" ? 1024 : 1);
        if (keep && at === CROSS_CPU) t.coldCross.push(rep.touch_ns);
        else if (keep) {
          t.cold.push(rep.touch_ns);
          t.fetched.push(bytes);
        }
      }
      // Warm cache (what the cold run left), a new daemon: fault latency vs the local file.
      for (const [mem, extra, p50, p99] of [
        [ref("base/vm-nows"), [...ep, "--cache-dir", cache], t.warmP50, t.warmP99],
        [img, [], t.localP50, t.localP99],
      ] as const) {
        const sock = ctx.socket("gw");
        const d = await startStoreDaemon(sock, rgw.env, ["--mem", mem, ...extra, "--fault-around", "1"], SAME_CPU.handler);
        const rep = await runStandin(sock, ["--expect", img, ...lat], SAME_CPU.guest);
        await stopSnapload(d);
        if (keep) {
          p50.push(rep.lat_p50_ns);
          p99.push(rep.lat_p99_ns);
        }
      }
      if (keep) ctx.log(`s run ${r}: cold ${fmtTime(t.cold.at(-1)!)} vs local ${fmtTime(t.local.at(-1)!)}; warm p50 ${fmtTime(t.warmP50.at(-1)!)} vs ${fmtTime(t.localP50.at(-1)!)}`);
      rmSync(cache, { recursive: true, force: true });
    }

    // Push throughput.
    const pushT: number[] = [];
    const plainT: number[] = [];
    const secondT: number[] = [];
    const secondHash: number[] = [];
    const secondUpload: number[] = [];
    const raw = readFileSync(img);
    const next = join(ctx.dir, "store-next.mem");
    for (let r = 0; r < ctx.opts.runs; r++) {
      let t0 = performance.now();
      await client.write(`plain/${r}.mem`, raw);
      plainT.push(performance.now() - t0);
      t0 = performance.now();
      await push(img, ref(`p${r}/vm`), { s3Endpoint: rgw.endpoint });
      pushT.push(performance.now() - t0);
      copyFileSync(img, next);
      mutate(next, 100 + r, 32);
      t0 = performance.now();
      const rep = await push(next, ref(`p${r}/vm2`), { s3Endpoint: rgw.endpoint });
      secondT.push(performance.now() - t0);
      secondHash.push(rep.phases.hashMs);
      secondUpload.push(rep.phases.uploadMs);
      ctx.log(`s push ${r}: plain PUT ${plainT.at(-1)!.toFixed(0)} ms, push ${pushT.at(-1)!.toFixed(0)} ms, second push ${secondT.at(-1)!.toFixed(0)} ms (${rep.uploadedChunks} chunks uploaded)`);
    }

    // Storage: 10 snapshots a few seconds apart (each 0.5% of pages rewritten), in a file:// store.
    const storage: Record<string, { one: number; ten: number }> = {};
    for (const [label, run] of [["clustered", 32], ["scattered", 1]] as const) {
      const fstore = join(ctx.dir, `store-10-${label}`);
      rmSync(fstore, { recursive: true, force: true });
      mkdirSync(fstore, { recursive: true });
      copyFileSync(img, next);
      let one = 0;
      for (let i = 0; i < 10; i++) {
        if (i > 0) mutate(next, 500 + i, run);
        await push(next, `file://${fstore}/s${i}`, {});
        if (i === 0) one = dirBytes(join(fstore, "chunks"));
      }
      storage[label] = { one, ten: dirBytes(join(fstore, "chunks")) };
    }
    const fstore = join(ctx.dir, "store-10-clustered");
    // Decompression + verification throughput, one core, every chunk of one snapshot.
    const m0 = decodeManifest(readFileSync(join(fstore, manifestKey("s0"))), "bench");
    const objs = [...new Set(m0.body.chunks.filter((h): h is string => h !== null))].map((h) => ({ h, o: new Uint8Array(readFileSync(join(fstore, chunkKey(h)))) }));
    let logical = 0;
    let storedSum = 0;
    const d0 = performance.now();
    for (const { h, o } of objs) {
      logical += decodeChunk(o, h, m0.body.chunkSize, "bench").length;
      storedSum += o.length;
    }
    const decSec = (performance.now() - d0) / 1000;

    const s = {
      local: summarize(t.local),
      localCross: summarize(t.localCross),
      coldCross: summarize(t.coldCross),
      cold: summarize(t.cold),
      fetched: summarize(t.fetched),
      warmP50: summarize(t.warmP50),
      warmP99: summarize(t.warmP99),
      localP50: summarize(t.localP50),
      localP99: summarize(t.localP99),
      push: summarize(pushT),
      plain: summarize(plainT),
      second: summarize(secondT),
    };
    const coldRatio = s.cold.median / s.local.median;
    const fetchRatio = s.fetched.median / touchedStored;
    const p50Ratio = s.warmP50.median / s.localP50.median;
    const p99Ratio = s.warmP99.median / s.localP99.median;
    const pushRatio = s.plain.median / s.push.median;
    const secondRatio = s.push.median / s.second.median;
    const storeRatio = storage.clustered!.ten / storage.clustered!.one;
    const scatterRatio = storage.scattered!.ten / storage.scattered!.one;
    const ms = (x: number) => fmtTime(x * 1e6);
    const rows: Row[] = [
      { what: `**restore, cold cache: ${set.length} pages (10%, runs of ${CLUSTER}) of a ${mib} MiB guest-like image, working set prefetched**` },
      { what: "serve --mem s3://… (Ceph RGW), empty --cache-dir, manifest working set", median: fmtTime(s.cold.median), best: fmtTime(s.cold.min), result: `**${coldRatio.toFixed(2)}x** local file`, target: `≤ 2 ${check(coldRatio <= 2)}` },
      { what: "serve --mem FILE --prefetch WS (local raw file)", median: fmtTime(s.local.median), best: fmtTime(s.local.min) },
      { what: "the same two, guest on the other CPU (cross CPU): store", median: fmtTime(s.coldCross.median), best: fmtTime(s.coldCross.min), result: `**${(s.coldCross.median / s.localCross.median).toFixed(2)}x** local file` },
      { what: "the same two, guest on the other CPU (cross CPU): local raw file", median: fmtTime(s.localCross.median), best: fmtTime(s.localCross.min) },
      { what: "bytes fetched from RGW vs stored chunks the guest touched", median: `${(s.fetched.median / MiB).toFixed(1)} MiB`, result: `**${fetchRatio.toFixed(2)}x** (${(touchedStored / MiB).toFixed(1)} MiB in ${touchedChunks.size} chunks)`, target: `≤ 1.5 ${check(fetchRatio <= 1.5)}` },
      { what: "**restore, warm cache (new daemon, the cold run's --cache-dir): fault latency, one page per fault, the same pages, no prefetch**" },
      { what: "p50, store (warm cache) vs local file", median: fmtTime(s.warmP50.median), best: fmtTime(s.warmP50.min), result: `**${p50Ratio.toFixed(2)}x** (local ${fmtTime(s.localP50.median)})`, target: `≤ 1.25 ${check(p50Ratio <= 1.25)}` },
      { what: "p99, store (warm cache) vs local file", median: fmtTime(s.warmP99.median), best: fmtTime(s.warmP99.min), result: `**${p99Ratio.toFixed(2)}x** (local ${fmtTime(s.localP99.median)})`, target: `≤ 1.25 ${check(p99Ratio <= 1.25)}` },
      { what: `**push to RGW, ${mib} MiB**` },
      { what: "snapload push (first: every chunk uploaded)", median: ms(s.push.median), best: ms(s.push.min), result: `**${pushRatio.toFixed(2)}x** a plain PUT; ${fmtRate(size / (s.push.median / 1000))} of image`, target: `≥ 0.8 ${check(pushRatio >= 0.8)}` },
      { what: "one plain PUT of the raw file (as aws s3 cp)", median: ms(s.plain.median), best: ms(s.plain.min), result: fmtRate(size / (s.plain.median / 1000)) },
      { what: "second push, 0.5% of pages rewritten (runs of 32 pages)", median: ms(s.second.median), best: ms(s.second.min), result: `**${secondRatio.toFixed(1)}x** faster than the first`, target: `≥ 10 ${check(secondRatio >= 10)}` },
      { what: "… of which hashing the image (every core; listing and uploads meanwhile) / uploads left after it", median: `${ms(summarize(secondHash).median)} / ${ms(summarize(secondUpload).median)}` },
      { what: "**storage**" },
      { what: "10 snapshots, each 0.5% of pages rewritten after the previous (runs of 32 pages), vs one", result: `**${storeRatio.toFixed(2)}x** (${(storage.clustered!.ten / MiB).toFixed(1)} MiB vs ${(storage.clustered!.one / MiB).toFixed(1)} MiB)`, target: `≤ 2 ${check(storeRatio <= 2)}` },
      { what: "same, the rewritten pages scattered uniformly (worst case for chunking)", result: `${scatterRatio.toFixed(2)}x (${(storage.scattered!.ten / MiB).toFixed(1)} MiB vs ${(storage.scattered!.one / MiB).toFixed(1)} MiB)` },
      { what: `compression (zstd ${m0.body.compression.level}, data chunks) / decompression + SHA-256, one core`, result: `${(logical / storedSum).toFixed(2)}x; ${fmtRate(logical / decSec)}` },
    ];
    return {
      id: "s",
      title: "snapshots in object storage (Ceph RGW on loopback)",
      status: "ok",
      notes: [],
      rows,
      data: { mib, s, touchedStored, storage, logical, storedSum, decSec },
    };
  } finally {
    for (const k of Object.keys(rgw.env)) if (envBefore[k] === undefined) delete process.env[k];
    await rgw.stop();
  }
};
