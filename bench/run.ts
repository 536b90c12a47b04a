// The benchmark suite (`npm run bench`): real processes — snapload, the plain-C handler, the
// kernel baselines and the C VMM stand-in as the guest — pinned, repeated, verified.
//   bun bench/run.ts [--quick] [--only a,b,...|micro] [--runs N]
// Writes bench/results.json and bench/results.md, and prints the markdown table.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { availableParallelism, loadavg, release, tmpdir } from "node:os";
import { join } from "node:path";
import type { BenchOptions, Ctx, Features, Scenario, ScenarioResult } from "./common.ts";
import { makeDemoImage, makeRandomImage } from "./common.ts";
import { BUN, CpuMeter, killAll, MAIN, pinned, Proc, ROOT } from "./procs.ts";
import { defaults } from "./scenarios/defaults.ts";
import { faultAround } from "./scenarios/fault-around.ts";
import { fairness } from "./scenarios/fairness.ts";
import { overhead } from "./scenarios/overhead.ts";
import { population } from "./scenarios/population.ts";
import { postcopy } from "./scenarios/postcopy.ts";
import { qemu } from "./scenarios/qemu.ts";
import { scale } from "./scenarios/scale.ts";
import { store } from "./scenarios/store.ts";
import { workingSet } from "./scenarios/working-set.ts";
import { type MicroSummary, renderMarkdown, type Results } from "./table.ts";

const SCENARIOS: [string, string, Scenario][] = [
  ["a", "overhead", overhead],
  ["b", "full population", population],
  ["c", "working-set restore", workingSet],
  ["d", "postcopy", postcopy],
  ["e", "scale", scale],
  ["f", "fault-around sweep", faultAround],
  ["g", "defaults on every core layout", defaults],
  ["h", "fairness", fairness],
  ["s", "object storage", store],
  ["q", "QEMU restore", qemu],
];

/** Above this share of foreign CPU time a scenario's figures get a warning. */
const FOREIGN_WARN = 0.03;

function parseArgs(argv: string[]): BenchOptions {
  let quick = false;
  let runs: number | undefined;
  let only: Set<string> | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const [name, inline] = a.includes("=") ? [a.slice(0, a.indexOf("=")), a.slice(a.indexOf("=") + 1)] : [a, undefined];
    const value = () => inline ?? argv[++i] ?? usage(`${name} needs a value`);
    if (name === "--quick") quick = true;
    else if (name === "--runs") {
      runs = Number(value());
      if (!Number.isInteger(runs) || runs < 1) usage("--runs must be a whole number >= 1");
    } else if (name === "--only") {
      only = new Set(value().split(",").map((s) => s.trim().toLowerCase()).filter(Boolean));
      const known = [...SCENARIOS.map((s) => s[0]), "micro"];
      for (const o of only) if (!known.includes(o)) usage(`--only: unknown scenario '${o}' (known: ${known.join(", ")})`);
    } else if (name === "--help" || name === "-h") usage();
    else usage(`unknown option ${a}`);
  }
  return { quick, runs: runs ?? (quick ? 2 : 5), only };
}

function usage(err?: string): never {
  if (err) console.error(`bench: ${err}`);
  console.error(`usage: bun bench/run.ts [--quick] [--only ${[...SCENARIOS.map((s) => s[0]), "micro"].join(",")}] [--runs N]`);
  process.exit(err ? 2 : 0);
}

function machine(): Results["machine"] {
  let cpu = "unknown";
  try {
    cpu = readFileSync("/proc/cpuinfo", "utf8").match(/^model name\s*:\s*(.+)$/m)?.[1]?.trim() ?? cpu;
  } catch {
    // not Linux?
  }
  return { nproc: availableParallelism(), kernel: release(), cpu, bun: Bun.version };
}

function features(): Features {
  const r = Bun.spawnSync([BUN, MAIN, "help"], { stdout: "pipe", stderr: "pipe" });
  const help = `${r.stdout.toString()}\n${r.stderr.toString()}`;
  if (!help.includes("snapload serve")) throw new Error(`\`snapload help\` did not print the usage:\n${help}`);
  return {
    record: help.includes("--record"),
    prefetch: help.includes("--prefetch"),
    populate: help.includes("--populate"),
    pageServer: help.includes("page-server"),
  };
}

async function runMicro(dir: string): Promise<Results["micro"]> {
  const out = join(dir, "micro.json");
  const p = new Proc("micro", pinned(0, [BUN, join(import.meta.dir, "micro.ts"), "--out", out]));
  const code = await p.wait(180_000);
  process.stderr.write(p.stderr);
  if (code !== 0) return { status: "failed", error: `bench/micro.ts ${p.describeExit()}: ${p.stderr.trim().split("\n").slice(-3).join(" / ")}` };
  return { status: "ok", summary: JSON.parse(readFileSync(out, "utf8")) as MicroSummary };
}

async function main(): Promise<number> {
  const opts = parseArgs(process.argv.slice(2));
  const t0 = performance.now();
  const loadStart = loadavg()[0]!;
  const dir = mkdtempSync(join(tmpdir(), "snapload-bench-"));
  const feats = features();
  const log = (msg: string) => process.stderr.write(`[${((performance.now() - t0) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`);
  log(`features: ${Object.entries(feats).map(([k, v]) => `${k}=${v ? "yes" : "no"}`).join(" ")}; runs ${opts.runs}${opts.quick ? ", quick" : ""}; scratch ${dir}`);
  let sockets = 0;
  const ctx: Ctx = {
    opts,
    dir,
    features: feats,
    image(mib: number) {
      const path = join(dir, `image-${mib}m.raw`);
      const t = performance.now();
      makeRandomImage(path, mib);
      const ms = performance.now() - t;
      if (ms > 50) log(`made ${mib} MiB random image in ${(ms / 1000).toFixed(1)} s`);
      return path;
    },
    demoImage(mib: number) {
      const path = join(dir, `demo-${mib}m.raw`);
      const t = performance.now();
      const st = makeDemoImage(path, mib);
      if (st) log(`made ${mib} MiB demo image (${((st.zeroPages / st.pages) * 100).toFixed(0)}% zero pages as holes) in ${((performance.now() - t) / 1000).toFixed(1)} s`);
      return path;
    },
    socket(tag: string) {
      return join(dir, `${tag}${sockets++}.sock`);
    },
    log,
  };

  const scenarios: ScenarioResult[] = [];
  let micro: Results["micro"] = { status: "skipped" };
  try {
    for (const [id, title, fn] of SCENARIOS) {
      if (opts.only && !opts.only.has(id)) continue;
      log(`${id}: ${title}`);
      const meter = new CpuMeter(availableParallelism());
      let result: ScenarioResult;
      try {
        result = await fn(ctx);
      } catch (e) {
        const msg = e instanceof Error ? e.message : String(e);
        log(`${id}: FAILED: ${msg}`);
        result = { id, title, status: "failed", notes: [], rows: [], data: {}, error: msg };
      } finally {
        killAll(); // nothing a scenario started outlives it
      }
      const cpu = meter.stop();
      result.data.cpu = cpu;
      if (cpu.foreignShare > FOREIGN_WARN) {
        const note = `other processes used ${(cpu.foreignShare * 100).toFixed(0)}% of the machine's CPU time during this scenario (${cpu.foreignSec.toFixed(1)} CPU-s of ${(cpu.wallSec * availableParallelism()).toFixed(1)}): its figures are skewed`;
        result.notes.push(note);
        log(`${id}: warning: ${note}`);
      }
      scenarios.push(result);
    }
    if (!opts.only || opts.only.has("micro")) {
      log("micro: mitata");
      micro = await runMicro(dir);
    }
  } finally {
    killAll();
    rmSync(dir, { recursive: true, force: true });
  }

  const failed = scenarios.filter((s) => s.status === "failed").length + (micro?.status === "failed" ? 1 : 0);
  const results: Results = {
    date: new Date().toISOString(),
    machine: { ...machine(), loadavg1mStart: loadStart, loadavg1mEnd: loadavg()[0]! },
    options: { quick: opts.quick, runs: opts.runs, only: opts.only ? [...opts.only] : null },
    features: feats,
    durationSec: Math.round((performance.now() - t0) / 1000),
    ok: failed === 0,
    scenarios,
    micro,
  };
  const md = renderMarkdown(results);
  await Bun.write(join(ROOT, "bench", "results.json"), `${JSON.stringify(results, null, 2)}\n`);
  await Bun.write(join(ROOT, "bench", "results.md"), md);
  process.stdout.write(`\n${md}`);
  log(`done in ${results.durationSec} s; wrote bench/results.json and bench/results.md${failed ? `; ${failed} FAILED` : ""}`);
  return failed ? 1 : 0;
}

process.exitCode = await main();
