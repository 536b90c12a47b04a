// Shared test plumbing: real processes only — the daemon under test, the C VMM stand-in
// (csrc/tools/vmm-standin.c) and the hostile peer (test/hostile-peer.c).
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { EventName, LogRecord } from "../src/core/log.ts";
import { writeDemoImage } from "../src/cli/demo-image.ts";

export const ROOT = join(import.meta.dir, "..");
export const BUN = process.execPath;
export const STANDIN = join(ROOT, "build", "vmm-standin");
export const HOSTILE_PEER = join(ROOT, "build", "hostile-peer");
/** hostile-peer's exit code when the handler closed the connection (what a refusal looks like). */
export const REFUSED = 3;

let built = false;
/** Builds the C core, the stand-in and the test tools (a no-op when up to date). */
export function ensureBuilt(): void {
  if (built) return;
  const r = Bun.spawnSync([BUN, join(ROOT, "scripts/build-c.ts")], { stdout: "inherit", stderr: "inherit" });
  if (r.exitCode !== 0) throw new Error("C build failed");
  built = true;
}

export function tempDir(prefix = "snapload-test-"): { path: string; cleanup: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, cleanup: () => rmSync(path, { recursive: true, force: true }) };
}

/** The JSON events (--log-format json) in a process's stderr; other lines (a final `snapload: ...` error) are skipped. */
export function parseEvents(stderr: string): LogRecord[] {
  const out: LogRecord[] = [];
  for (const line of stderr.split("\n")) if (line.startsWith("{")) out.push(JSON.parse(line) as LogRecord);
  return out;
}

export class Daemon {
  private stderrText = "";
  private readonly done: Promise<number>;
  private waiters: (() => void)[] = [];

  constructor(
    readonly proc: Bun.Subprocess<"ignore", "pipe", "pipe">,
    readonly socket: string,
  ) {
    this.done = this.pump().then(() => proc.exited);
  }

  private async pump(): Promise<void> {
    const decoder = new TextDecoder();
    for await (const chunk of this.proc.stderr) {
      this.stderrText += decoder.decode(chunk, { stream: true });
      for (const w of this.waiters.splice(0)) w();
    }
  }

  get log(): string {
    return this.stderrText;
  }

  /**
   * Resolves when the log matches, or rejects after timeoutMs with the log so far. For daemons that
   * log text; new tests start theirs with --log-format json and use waitForEvent (docs/events.md).
   */
  async waitForLog(pattern: RegExp, timeoutMs = 10_000): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.stderrText.match(pattern);
      if (m) return m;
      if (Date.now() > deadline) throw new Error(`log never matched ${pattern}; log so far:\n${this.stderrText}`);
      if (this.proc.exitCode !== null) throw new Error(`daemon exited (${this.proc.exitCode}) before ${pattern}; log:\n${this.stderrText}`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
  }

  /** The daemon's events so far (it must run with --log-format json; other lines are skipped). */
  events(): LogRecord[] {
    return parseEvents(this.stderrText);
  }

  /** Resolves with the first event named `name` that satisfies `match` (the daemon must log JSON). */
  async waitForEvent(name: EventName, match: (e: LogRecord) => boolean = () => true, timeoutMs = 10_000): Promise<LogRecord> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const e = this.events().find((e) => e.event === name && match(e));
      if (e) return e;
      if (Date.now() > deadline) throw new Error(`no ${name} event; log so far:\n${this.stderrText}`);
      if (this.proc.exitCode !== null) throw new Error(`daemon exited (${this.proc.exitCode}) before a ${name} event; log:\n${this.stderrText}`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
  }

  /** Resolves with the matching events once there are at least `count` of them. */
  async waitForEvents(name: EventName, count: number, match: (e: LogRecord) => boolean = () => true, timeoutMs = 10_000): Promise<LogRecord[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const all = this.events().filter((e) => e.event === name && match(e));
      if (all.length >= count) return all;
      if (Date.now() > deadline) throw new Error(`${all.length} of ${count} ${name} events; log so far:\n${this.stderrText}`);
      if (this.proc.exitCode !== null) throw new Error(`daemon exited (${this.proc.exitCode}) with ${all.length} of ${count} ${name} events; log:\n${this.stderrText}`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
  }

  /** SIGTERM, then the exit code. */
  async stop(): Promise<number> {
    if (this.proc.exitCode === null) this.proc.kill("SIGTERM");
    const killer = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
    const code = await this.done;
    clearTimeout(killer);
    return code;
  }
}

export async function startDaemon(args: string[], socket: string, extraEnv: Record<string, string> = {}): Promise<Daemon> {
  const proc = Bun.spawn([BUN, join(ROOT, "src/main.ts"), "serve", "--socket", socket, ...args], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, ...extraEnv },
  });
  const d = new Daemon(proc, socket);
  if (logsJson(args)) await d.waitForEvent("daemon.listening");
  else await d.waitForLog(/listening on/);
  return d;
}

/** Whether a daemon's arguments ask for JSON events (`--log-format json`). */
export function logsJson(args: string[]): boolean {
  const i = args.lastIndexOf("--log-format");
  return i >= 0 && args[i + 1] === "json";
}

/** The one JSON line the VMM stand-in prints on success. */
export interface StandinReport {
  pages: number;
  verified: number;
  mismatches: number;
  first_mismatch: number;
  touch_ns: number;
  lat_p50_ns: number;
  lat_p99_ns: number;
  lat_max_ns: number;
  threads: number;
}

export interface StandinResult {
  code: number;
  stdout: string;
  stderr: string;
  report?: StandinReport;
}

/** Writes bytes at offset into an existing file (tests that corrupt images and headers). */
export function patchFile(path: string, offset: number, bytes: number[]): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** Runs the C VMM stand-in to completion. */
export async function runStandin(args: string[], timeoutMs = 60_000): Promise<StandinResult> {
  const r = await runTool(STANDIN, args, timeoutMs);
  const line = r.stdout.trim().split("\n").pop();
  return line?.startsWith("{") ? { ...r, report: JSON.parse(line) } : r;
}

/** Runs the hostile peer (test/hostile-peer.c) to completion: exit REFUSED when the handler closed on it. */
export function runHostilePeer(args: string[], timeoutMs = 60_000): Promise<StandinResult> {
  return runTool(HOSTILE_PEER, args, timeoutMs);
}

async function runTool(path: string, args: string[], timeoutMs: number): Promise<StandinResult> {
  const proc = Bun.spawn([path, ...args], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const killer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(killer);
  return { code, stdout, stderr };
}

/** Expects a clean, fully verified restore, with the stand-in's words in the failure message. */
export function describeRun(r: StandinResult): string {
  return `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `snapload ARGS...` from source to completion (killed after timeoutMs). */
export async function runSnapload(args: string[], opts: { timeoutMs?: number; cwd?: string; env?: Record<string, string> } = {}): Promise<CliResult> {
  const proc = Bun.spawn([BUN, join(ROOT, "src/main.ts"), ...args], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    cwd: opts.cwd,
    env: opts.env ?? process.env,
  });
  const killer = setTimeout(() => proc.kill("SIGKILL"), opts.timeoutMs ?? 20_000);
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(killer);
  return { code, stdout, stderr };
}

const NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages";

function meminfo(field: string): number {
  const m = readFileSync("/proc/meminfo", "utf8").match(new RegExp(`^${field}:\\s+(\\d+)`, "m"));
  return m ? Number(m[1]) : -1;
}

/**
 * Reserves `need` free 2 MiB huge pages (raising vm.nr_hugepages) at module load, so that
 * test.skipIf sees the outcome. `skipReason` is "" when they are there; `restore()` (afterAll)
 * puts vm.nr_hugepages back.
 */
export function reserveHugePages(need: number, file: string): { skipReason: string; restore(): void } {
  let oldNr: number | undefined;
  let skipReason = "";
  try {
    oldNr = Number(readFileSync(NR_HUGEPAGES, "utf8").trim());
    const free = meminfo("HugePages_Free");
    if (free < need) writeFileSync(NR_HUGEPAGES, String(meminfo("HugePages_Total") + (need - free)));
    const now = meminfo("HugePages_Free");
    if (now < need) skipReason = `the kernel gave only ${now} free 2 MiB huge pages (need ${need}) after writing ${NR_HUGEPAGES}`;
  } catch (e) {
    skipReason = `cannot reserve huge pages through ${NR_HUGEPAGES}: ${(e as Error).message}`;
  }
  if (skipReason) console.warn(`${file}: SKIPPING every case: ${skipReason}`);
  return {
    skipReason,
    restore() {
      if (oldNr === undefined) return;
      try {
        writeFileSync(NR_HUGEPAGES, String(oldNr));
      } catch (e) {
        console.warn(`${file}: could not restore ${NR_HUGEPAGES} to ${oldNr}: ${(e as Error).message}`);
      }
    },
  };
}

/**
 * The store tests' fixture: a demo image of `size` bytes (`seed`) at DIR/vm.mem, pushed with
 * `snapload push` to file://DIR/store/vm. Throws with push's stderr if the push fails.
 */
export async function pushDemoImage(dir: string, size: number, seed: number, pushArgs: string[] = []): Promise<{ image: string; store: string }> {
  const image = join(dir, "vm.mem");
  writeDemoImage(image, size, seed);
  const store = join(dir, "store");
  const p = await runSnapload(["push", image, `file://${store}/vm`, ...pushArgs]);
  if (p.code !== 0) throw new Error(`push of the test image failed (exit ${p.code}): ${p.stderr}`);
  return { image, store };
}
