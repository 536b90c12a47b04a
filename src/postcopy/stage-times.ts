// Where an urgent (fault) request's time goes, stage by stage: queued in our process before its
// REQUEST left, the round trip until its DATA header was read (wire + page server), receiving
// and decrypting the payload, installing it. Kept per VM as a fixed-size uniform sample (so a
// long restore costs no more memory than a short one) and reported once, when the VM is done
// with the page server (the `remote.urgent_stages` event): the measurement issue 10 asks for
// before tuning anything on the fault path.
import { readFileSync } from "node:fs";
import { prng } from "../prng.ts";

export const STAGES = ["queue", "server", "receive", "install", "total"] as const;
export type Stage = (typeof STAGES)[number];
/** Samples kept per stage (Algorithm R beyond that): 16 KiB each. */
export const STAGE_SAMPLES = 4096;

/** Timestamps (Bun.nanoseconds()) of one request; 0 = not reached. */
export interface StageMarks {
  created: number;
  sent: number;
  header: number;
  opened: number;
}

export interface StageSummary {
  count: number;
  /** Per stage: [p50, p99, max] in µs. */
  us: Record<Stage, [number, number, number]>;
}

export class StageTimes {
  private samples: Float32Array | undefined;
  private seen = 0;
  private readonly max = new Float64Array(STAGES.length);
  private readonly random = prng(0x5ca1ab1e);

  /** Records a request installed at `installed` (ns). Requests missing a mark (re-sent, dropped) are skipped. */
  record(m: StageMarks, installed: number): void {
    if (m.sent === 0 || m.header === 0 || m.opened === 0) return;
    const d0 = m.sent - m.created;
    const d1 = m.header - m.sent;
    const d2 = m.opened - m.header;
    const d3 = installed - m.opened;
    const d4 = installed - m.created;
    const n = this.seen++;
    let slot = n;
    if (n >= STAGE_SAMPLES) {
      slot = Math.floor(this.random() * (n + 1));
      if (slot >= STAGE_SAMPLES) slot = -1;
    }
    const ds = [d0, d1, d2, d3, d4];
    for (let s = 0; s < STAGES.length; s++) if (ds[s]! > this.max[s]!) this.max[s] = ds[s]!;
    if (slot < 0) return;
    this.samples ??= new Float32Array(STAGE_SAMPLES * STAGES.length);
    for (let s = 0; s < STAGES.length; s++) this.samples[s * STAGE_SAMPLES + slot] = ds[s]! / 1000;
  }

  get count(): number {
    return this.seen;
  }

  summary(): StageSummary {
    const kept = Math.min(this.seen, STAGE_SAMPLES);
    const us = {} as Record<Stage, [number, number, number]>;
    for (let s = 0; s < STAGES.length; s++) {
      const v = this.samples === undefined ? new Float32Array(0) : this.samples.slice(s * STAGE_SAMPLES, s * STAGE_SAMPLES + kept).sort();
      const q = (p: number) => (v.length === 0 ? 0 : round(v[Math.min(v.length - 1, Math.ceil(p * v.length) - 1)]!));
      us[STAGES[s]!] = [q(0.5), q(0.99), round(this.max[s]! / 1000)];
    }
    return { count: this.seen, us };
  }
}

/**
 * The calling thread's time on a CPU and waiting for one (runnable, not running) so far, in ms,
 * from Linux schedstat; undefined where it is not available. A wait that rivals the CPU time says
 * the host is short of CPU: every stage above includes such waits.
 */
export function threadSchedMs(): { cpu: number; waiting: number } | undefined {
  try {
    const [run, wait] = readFileSync("/proc/thread-self/schedstat", "utf8").split(" ").map(Number);
    if (!Number.isFinite(run) || !Number.isFinite(wait)) return undefined;
    return { cpu: run! / 1e6, waiting: wait! / 1e6 };
  } catch {
    return undefined;
  }
}

function round(us: number): number {
  return Math.round(us * 10) / 10;
}
