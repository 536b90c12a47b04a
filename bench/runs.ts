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
    sampler.stop();
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
