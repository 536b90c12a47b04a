// One measured restore: a handler (snapload or the plain-C one) plus the stand-in guest, both
// pinned, torn down whatever happens.
import type { Ctx } from "./common.ts";
import {
  type DaemonFigures,
  finishPlain,
  finishStandin,
  type MemStatus,
  MemSampler,
  type Proc,
  runStandin,
  type StandinReport,
  startPlain,
  startSnapload,
  startStandin,
  stopSnapload,
} from "./procs.ts";

export interface Placement {
  name: string;
  handler: number;
  guest: number;
}

export const SAME_CPU: Placement = { name: "same CPU", handler: 0, guest: 0 };
export const CROSS_CPU: Placement = { name: "cross CPU", handler: 0, guest: 1 };

export interface Measured {
  report: StandinReport;
  handler: DaemonFigures;
}

/** `snapload serve --mem IMG ...serveArgs` serving one stand-in. */
export async function snaploadRun(ctx: Ctx, mem: string, serveArgs: string[], guestArgs: string[], at: Placement, expect = mem): Promise<Measured> {
  const sock = ctx.socket("s");
  const d = await startSnapload(sock, ["--mem", mem, ...serveArgs], at.handler);
  try {
    const report = await runStandin(sock, ["--expect", expect, ...guestArgs], at.guest);
    const figures = await stopSnapload(d);
    return { report, handler: figures[0] ?? {} };
  } finally {
    d.kill("SIGKILL");
  }
}

/** bench/plain-handler serving one stand-in. */
export async function plainRun(ctx: Ctx, mem: string, handlerArgs: string[], guestArgs: string[], at: Placement): Promise<Measured> {
  const sock = ctx.socket("p");
  const h = await startPlain(sock, mem, handlerArgs, at.handler);
  try {
    const report = await runStandin(sock, ["--expect", mem, ...guestArgs], at.guest);
    const handler = await finishPlain(h);
    return { report, handler };
  } finally {
    h.kill("SIGKILL");
  }
}

export interface ScaleMeasured {
  reports: StandinReport[];
  wallNs: number;
  mem: MemStatus;
  idle: MemStatus;
}

/** One daemon, several stand-ins at once (each its own region of the image); samples the daemon's memory. */
export async function snaploadMany(ctx: Ctx, mem: string, serveArgs: string[], guests: string[][], at: Placement): Promise<ScaleMeasured> {
  const sock = ctx.socket("m");
  const d = await startSnapload(sock, ["--mem", mem, ...serveArgs], at.handler);
  const guestsProcs: Proc[] = [];
  const idle = new MemSampler(d.pid).stop();
  const sampler = new MemSampler(d.pid, 10);
  try {
    const t0 = performance.now();
    for (const g of guests) guestsProcs.push(startStandin(sock, ["--expect", mem, ...g], at.guest));
    let reports: StandinReport[];
    try {
      reports = await Promise.all(guestsProcs.map((p) => finishStandin(p)));
    } finally {
      for (const p of guestsProcs) p.kill("SIGKILL");
    }
    const wallNs = (performance.now() - t0) * 1e6;
    const peak = sampler.stop();
    await stopSnapload(d);
    return { reports, wallNs, mem: peak, idle };
  } finally {
    sampler.stop();
    d.kill("SIGKILL");
  }
}

/**
 * One unmeasured run of each contender, results discarded. Fresh guest memory in this VM is
 * slow on its first touch after boot (the host faults it in), and the first run of anything
 * pays for it; so every scenario warms each contender up before its measured runs.
 */
export async function warmUp(ctx: Ctx, tag: string, contenders: { label: string; run: () => Promise<unknown> }[]): Promise<void> {
  const t0 = performance.now();
  for (const c of contenders) await c.run();
  ctx.log(`${tag} warm-up: ${contenders.length} contender${contenders.length === 1 ? "" : "s"} run once, discarded (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
}

/**
 * One long-lived handler serving many guests in turn — how a daemon is used in production, and
 * fair to both sides: neither pays process start-up, JIT warm-up or first-touch costs per run.
 * The first guest is a discarded warm-up.
 */
export class LongLivedHandler {
  private served = 0;
  private constructor(
    private readonly kind: "snapload" | "plain",
    private readonly proc: Proc,
    private readonly sock: string,
    private readonly mem: string,
    private readonly at: Placement,
  ) {}

  static async snapload(ctx: Ctx, mem: string, serveArgs: string[], at: Placement): Promise<LongLivedHandler> {
    const sock = ctx.socket("ls");
    const p = await startSnapload(sock, ["--mem", mem, ...serveArgs], at.handler);
    return new LongLivedHandler("snapload", p, sock, mem, at);
  }

  /** `count` = guests it will serve, warm-up included (the plain handler exits after them). */
  static async plain(ctx: Ctx, mem: string, handlerArgs: string[], at: Placement, count: number): Promise<LongLivedHandler> {
    const sock = ctx.socket("lp");
    const p = await startPlain(sock, mem, [...handlerArgs, "--count", String(count)], at.handler);
    return new LongLivedHandler("plain", p, sock, mem, at);
  }

  /** The handler's process id (to read its CPU time from /proc). */
  get pid(): number {
    return this.proc.pid;
  }

  async warmUp(guestArgs: string[]): Promise<void> {
    await this.run(guestArgs);
  }

  async run(guestArgs: string[]): Promise<StandinReport> {
    this.served++;
    return runStandin(this.sock, ["--expect", this.mem, ...guestArgs], this.at.guest);
  }

  /** Stops the handler; returns per-guest figures where the handler logs them. */
  async stop(): Promise<DaemonFigures[]> {
    try {
      if (this.kind === "snapload") return await stopSnapload(this.proc);
      return [await finishPlain(this.proc)];
    } finally {
      this.proc.kill("SIGKILL");
    }
  }
}

/** A variant's run() backed by one handler that lives across all its runs, started on first use. */
export function longLived(start: () => Promise<LongLivedHandler>, guest: string[], all: LongLivedHandler[]): () => Promise<number> {
  let h: Promise<LongLivedHandler> | undefined;
  return async () => {
    if (!h) {
      h = start();
      all.push(await h);
    }
    return (await (await h).run(guest)).touch_ns;
  };
}
