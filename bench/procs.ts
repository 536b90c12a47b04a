// Process plumbing for the benchmarks: every process we start is tracked and killed (by pid) on
// any way out — normal end, error, Ctrl-C — so no daemon outlives the run.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { LogRecord } from "../src/core/log.ts";
import type { StandinReport } from "../test/harness.ts";

export type { StandinReport };

export const ROOT = join(import.meta.dir, "..");
export const BUN = process.execPath;
export const MAIN = join(ROOT, "src", "main.ts");
export const STANDIN = join(ROOT, "build", "vmm-standin");
export const HOSTILE_PEER = join(ROOT, "build", "hostile-peer");
export const PLAIN = join(ROOT, "build", "plain-handler");
export const KERNEL = join(ROOT, "build", "kernel-baselines");

export class BenchError extends Error {}

const live = new Set<Proc>();
/** CPU time (µs) of every child that has exited, for telling our load from other people's. */
let childCpuUs = 0;

/** Kills (SIGKILL) every process we started that is still running. */
export function killAll(): void {
  for (const p of live) p.kill("SIGKILL");
}

process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(sig, () => {
    killAll();
    process.stderr.write(`bench: ${sig}, killed ${live.size} child process(es)\n`);
    process.exit(130);
  });
}

/** `taskset -c CPU cmd...` (taskset execs, so the pid is the program's own). */
export function pinned(cpu: number | undefined, cmd: string[]): string[] {
  return cpu === undefined ? cmd : ["taskset", "-c", String(cpu), ...cmd];
}

/** A child process whose stdout/stderr are collected as text. */
export class Proc {
  readonly proc: Bun.Subprocess<"ignore", "pipe", "pipe">;
  stdout = "";
  stderr = "";
  readonly exited: Promise<number>;
  private waiters: (() => void)[] = [];

  constructor(readonly name: string, readonly cmd: string[]) {
    this.proc = Bun.spawn(cmd, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    live.add(this);
    const pumps = [this.pump(this.proc.stdout, "stdout"), this.pump(this.proc.stderr, "stderr")];
    this.exited = Promise.all(pumps).then(async () => {
      const code = await this.proc.exited;
      const ru = this.proc.resourceUsage();
      if (ru) childCpuUs += Number(ru.cpuTime.total);
      live.delete(this);
      this.notify();
      return code;
    });
  }

  get pid(): number {
    return this.proc.pid;
  }

  get running(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  private async pump(stream: ReadableStream<Uint8Array>, which: "stdout" | "stderr"): Promise<void> {
    const dec = new TextDecoder();
    for await (const chunk of stream) {
      this[which] += dec.decode(chunk, { stream: true });
      this.notify();
    }
  }

  private notify(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Waits until stdout or stderr matches; throws (with the output so far) on exit or timeout. */
  async waitFor(pattern: RegExp, which: "stdout" | "stderr" | "either", timeoutMs = 15_000): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = which === "either" ? (this.stdout.match(pattern) ?? this.stderr.match(pattern)) : this[which].match(pattern);
      if (m) return m;
      if (!this.running) throw new BenchError(`${this.name} exited (${this.describeExit()}) before printing ${pattern}\n${this.tail()}`);
      if (Date.now() > deadline) throw new BenchError(`${this.name} did not print ${pattern} within ${timeoutMs} ms\n${this.tail()}`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 25);
      });
    }
  }

  /** Waits for exit; SIGKILLs after timeoutMs and throws. */
  async wait(timeoutMs: number): Promise<number> {
    let timedOut = false;
    const t = setTimeout(() => {
      timedOut = true;
      this.kill("SIGKILL");
    }, timeoutMs);
    const code = await this.exited;
    clearTimeout(t);
    if (timedOut) throw new BenchError(`${this.name} did not finish within ${timeoutMs} ms (killed)\n${this.tail()}`);
    return code;
  }

  /** Sends `signal`, then SIGKILL after graceMs; returns the exit code (or 128+signal). */
  async stop(signal: "SIGTERM" | "SIGINT" = "SIGTERM", graceMs = 5000): Promise<number> {
    if (this.running) this.kill(signal);
    const t = setTimeout(() => this.kill("SIGKILL"), graceMs);
    const code = await this.exited;
    clearTimeout(t);
    return code;
  }

  kill(signal: "SIGTERM" | "SIGINT" | "SIGKILL"): void {
    if (this.running) {
      try {
        this.proc.kill(signal);
      } catch {
        // already gone
      }
    }
  }

  describeExit(): string {
    return this.proc.signalCode ? `signal ${this.proc.signalCode}` : `exit ${this.proc.exitCode}`;
  }

  tail(lines = 12): string {
    const cut = (s: string) => s.trimEnd().split("\n").slice(-lines).join("\n");
    return `--- ${this.name} stdout:\n${cut(this.stdout)}\n--- ${this.name} stderr:\n${cut(this.stderr)}`;
  }
}

// ---- snapload daemon / plain handler ----------------------------------------------------------

export interface DaemonFigures {
  faults?: number;
  /** Pages the daemon installed (its exit line's "N pages served"), zero pages included. */
  pages?: number;
  /** Of those, zero pages (UFFDIO_ZEROPAGE: no copy, no RAM until the guest writes). */
  zeroPages?: number;
  /** `--populate background`/`--prefetch`: seconds from connect until every page was settled. */
  populatedSec?: number;
  prefetchedPages?: number;
  populatedPages?: number;
}

/** `snapload serve --socket S ...args`, logging JSON events; ready once it logs daemon.listening. */
export async function startSnapload(socket: string, args: string[], cpu: number | undefined): Promise<Proc> {
  const p = new Proc("snapload serve", pinned(cpu, [BUN, MAIN, "serve", "--socket", socket, "--log-format", "json", ...args]));
  try {
    await p.waitFor(/"event":"daemon\.listening"/, "stderr", 30_000);
  } catch (e) {
    p.kill("SIGKILL");
    throw e;
  }
  return p;
}

/** The JSON events (docs/events.md) a daemon wrote. */
function events(p: Proc): LogRecord[] {
  return p.stderr.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as LogRecord);
}

/** SIGTERM; a daemon that does not exit cleanly fails the benchmark. Returns its per-VM figures. */
export async function stopSnapload(p: Proc): Promise<DaemonFigures[]> {
  const code = await p.stop("SIGTERM");
  if (code !== 0) throw new BenchError(`snapload serve exited with ${p.describeExit()}\n${p.tail()}`);
  const all = events(p);
  const errors = all.filter((e) => e.level === "error");
  if (errors.length) throw new BenchError(`snapload logged errors:\n${errors.slice(0, 5).map((e) => `${e.event}: ${e.msg}`).join("\n")}`);
  // Per VM, in order of their ids: its exit, and its detach when it was fully populated.
  const vms = new Map<number, DaemonFigures>();
  const vm = (id: number) => vms.get(id) ?? vms.set(id, {}).get(id)!;
  for (const e of all) {
    if (e.event === "vm.exited") Object.assign(vm(e.vm as number), { pages: e.pages, zeroPages: e.zeroPages, faults: e.faults });
    if (e.event === "vm.detached") Object.assign(vm(e.vm as number), { populatedSec: e.seconds, prefetchedPages: e.prefetchedPages, populatedPages: e.populatedPages });
  }
  return [...vms.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1]);
}

/** bench/plain-handler, ready once it prints "ready". It exits by itself after its VMM hangs up. */
export async function startPlain(socket: string, mem: string, args: string[], cpu: number | undefined): Promise<Proc> {
  const p = new Proc("plain-handler", pinned(cpu, [PLAIN, "--socket", socket, "--mem", mem, ...args]));
  try {
    await p.waitFor(/^ready$/m, "stdout", 15_000);
  } catch (e) {
    p.kill("SIGKILL");
    throw e;
  }
  return p;
}

export async function finishPlain(p: Proc): Promise<DaemonFigures> {
  const code = await p.wait(15_000);
  if (code !== 0) throw new BenchError(`plain-handler exited with ${p.describeExit()}\n${p.tail()}`);
  const m = p.stderr.match(/served (\d+) faults, (\d+) pages/);
  return m ? { faults: Number(m[1]), pages: Number(m[2]) } : {};
}

// ---- the guest -------------------------------------------------------------------------------


/** Starts the VMM stand-in; `finishStandin` checks it served every page right. */
export function startStandin(socket: string, args: string[], cpu: number | undefined, timeoutMs = 120_000): Proc {
  return new Proc("vmm-standin", pinned(cpu, [STANDIN, "--socket", socket, "--timeout", String(timeoutMs), ...args]));
}

/** A wrong page, a crash or a missing report is a failed benchmark, never a number. */
export async function finishStandin(p: Proc, timeoutMs = 130_000): Promise<StandinReport> {
  const code = await p.wait(timeoutMs);
  const line = p.stdout.trim().split("\n").pop() ?? "";
  let report: StandinReport | undefined;
  if (line.startsWith("{")) report = JSON.parse(line) as StandinReport;
  if (report && report.mismatches !== 0) {
    throw new BenchError(`WRONG PAGES SERVED: ${report.mismatches} of ${report.verified} verified pages mismatch (first: page ${report.first_mismatch})\n${p.tail()}`);
  }
  if (code !== 0 || !report) throw new BenchError(`vmm-standin failed (${p.describeExit()})\n${p.tail()}`);
  if (report.verified !== report.pages) throw new BenchError(`vmm-standin verified ${report.verified} of ${report.pages} touched pages\n${p.tail()}`);
  return report;
}

export async function runStandin(socket: string, args: string[], cpu: number | undefined): Promise<StandinReport> {
  return finishStandin(startStandin(socket, args, cpu));
}

export interface KernelReport {
  mode: string;
  pages: number;
  bytes: number;
  ns: number;
}

export async function runKernel(mem: string, args: string[], cpu: number | undefined): Promise<KernelReport> {
  const p = new Proc("kernel-baselines", pinned(cpu, [KERNEL, "--mem", mem, ...args]));
  const code = await p.wait(120_000);
  if (code === 1) throw new BenchError(`kernel-baselines read WRONG PAGES\n${p.tail()}`);
  const line = p.stdout.trim().split("\n").pop() ?? "";
  if (code !== 0 || !line.startsWith("{")) throw new BenchError(`kernel-baselines failed (${p.describeExit()})\n${p.tail()}`);
  return JSON.parse(line) as KernelReport;
}

// ---- /proc -----------------------------------------------------------------------------------

export interface MemStatus {
  VmHWM: number; // KiB
  VmRSS: number;
  RssAnon: number;
  RssFile: number;
}

export function memStatus(pid: number): MemStatus | undefined {
  const path = `/proc/${pid}/status`;
  if (!existsSync(path)) return undefined;
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return undefined;
  }
  const field = (name: string) => Number(text.match(new RegExp(`^${name}:\\s+(\\d+) kB`, "m"))?.[1] ?? NaN);
  return { VmHWM: field("VmHWM"), VmRSS: field("VmRSS"), RssAnon: field("RssAnon"), RssFile: field("RssFile") };
}

/** Samples /proc/PID/status every `everyMs` and keeps the maxima (VmHWM is the kernel's own peak). */
export class MemSampler {
  readonly peak: MemStatus = { VmHWM: 0, VmRSS: 0, RssAnon: 0, RssFile: 0 };
  private timer: ReturnType<typeof setInterval>;

  constructor(private readonly pid: number, everyMs = 20) {
    this.sample();
    this.timer = setInterval(() => this.sample(), everyMs);
  }

  sample(): void {
    const s = memStatus(this.pid);
    if (!s) return;
    for (const k of Object.keys(this.peak) as (keyof MemStatus)[]) if (s[k] > this.peak[k]) this.peak[k] = s[k];
  }

  stop(): MemStatus {
    this.sample();
    clearInterval(this.timer);
    return this.peak;
  }
}

// ---- whose CPU time? ----------------------------------------------------------------------------

/** Jiffies (USER_HZ = 100 on Linux) the whole machine spent busy, and stolen by the hypervisor. */
function machineCpu(): { busyUs: number; stealUs: number } {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = f;
  return { busyUs: (user + nice + system + irq + softirq) * 10_000, stealUs: steal * 10_000 };
}

function ownCpuUs(): number {
  const u = process.cpuUsage();
  return childCpuUs + u.user + u.system;
}

export interface CpuShare {
  wallSec: number;
  /** CPU seconds the machine spent busy / of those ours (this process and its children) / the rest. */
  busySec: number;
  ownSec: number;
  foreignSec: number;
  stealSec: number;
  /** foreign CPU time as a share of all CPU time available (wall × nproc). */
  foreignShare: number;
}

/** Measures how much CPU other processes took while we measured: a busy machine skews every figure. */
export class CpuMeter {
  private readonly t0 = performance.now();
  private readonly m0 = machineCpu();
  private readonly own0 = ownCpuUs();

  constructor(private readonly nproc: number) {}

  stop(): CpuShare {
    const wallSec = (performance.now() - this.t0) / 1000;
    const m = machineCpu();
    const busySec = (m.busyUs - this.m0.busyUs) / 1e6;
    const ownSec = (ownCpuUs() - this.own0) / 1e6;
    const foreignSec = Math.max(0, busySec - ownSec);
    return { wallSec, busySec, ownSec, foreignSec, stealSec: (m.stealUs - this.m0.stealUs) / 1e6, foreignShare: wallSec > 0 ? foreignSec / (wallSec * this.nproc) : 0 };
  }
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
export function freePort(): number {
  const s = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = s.port;
  s.stop(true);
  return port;
}
