// Renders bench/results.json as the markdown the README includes.
import type { BenchOptions, Features, ScenarioResult } from "./common.ts";

export interface Machine {
  nproc: number;
  kernel: string;
  cpu: string;
  bun: string;
  /** 1-minute load average before and after: other work on the machine skews the figures. */
  loadavg1mStart?: number;
  loadavg1mEnd?: number;
}

export type MicroSummary = Record<string, { avg_ns: number; p50_ns: number; min_ns: number; p99_ns: number }>;

export interface Results {
  date: string;
  machine: Machine;
  options: Omit<BenchOptions, "only"> & { only: string[] | null };
  features: Features;
  durationSec: number;
  ok: boolean;
  scenarios: ScenarioResult[];
  micro?: { status: "ok" | "failed" | "skipped"; summary?: MicroSummary; error?: string };
}

const cell = (s: string | undefined) => (s ?? "").replaceAll("|", "\\|").replaceAll("\n", " ");

export function renderMarkdown(r: Results): string {
  const m = r.machine;
  const out: string[] = [];
  out.push(`### snapload benchmarks (${r.date.slice(0, 10)})`);
  out.push("");
  out.push(
    `${r.date} · ${m.nproc} CPUs · Linux ${m.kernel} · ${m.cpu} · Bun ${m.bun} · ` +
      `${r.options.runs} runs per figure (median and best)${r.options.quick ? " · **quick mode** (small images)" : ""} · ` +
      `handler and guest pinned with \`taskset\`; figures are the guest's (VMM stand-in) touch time unless noted` +
      (m.loadavg1mStart !== undefined ? ` · load average ${m.loadavg1mStart.toFixed(2)} → ${m.loadavg1mEnd?.toFixed(2)}.` : "."),
  );
  out.push("");
  out.push("| | measurement | median | best | result | target |");
  out.push("|---|---|---|---|---|---|");
  for (const s of r.scenarios) {
    const status = s.status === "failed" ? " — **FAILED**" : s.status === "skipped" ? " — skipped" : "";
    out.push(`| **${s.id}** | **${cell(s.title)}**${status} | | | | |`);
    for (const row of s.rows) out.push(`| | ${cell(row.what)} | ${cell(row.median)} | ${cell(row.best)} | ${cell(row.result)} | ${cell(row.target)} |`);
    if (s.error) out.push(`| | error | | | ${cell(s.error.split("\n")[0])} | |`);
  }
  for (const s of r.scenarios) {
    for (const t of s.tables ?? []) {
      out.push("");
      out.push(`**${s.id}** — ${t.title}`);
      out.push("");
      out.push(`| ${t.header.map(cell).join(" | ")} |`);
      out.push(`|${t.header.map(() => "---").join("|")}|`);
      for (const row of t.rows) out.push(`| ${row.map(cell).join(" | ")} |`);
    }
  }
  if (r.micro) {
    out.push("");
    out.push("Micro-benchmarks (mitata, pinned to cpu 0):");
    out.push("");
    if (r.micro.summary) {
      out.push("| micro | avg | p50 | min |");
      out.push("|---|---|---|---|");
      for (const [name, v] of Object.entries(r.micro.summary)) out.push(`| ${cell(name)} | ${ns(v.avg_ns)} | ${ns(v.p50_ns)} | ${ns(v.min_ns)} |`);
    } else {
      out.push(`micro: ${r.micro.status}${r.micro.error ? `: ${cell(r.micro.error.split("\n")[0])}` : ""}`);
    }
  }
  const notes = r.scenarios.flatMap((s) => s.notes.map((n) => `- ${s.id}: ${n}`));
  if (notes.length) {
    out.push("");
    out.push(...notes);
  }
  return `${out.join("\n")}\n`;
}

function ns(v: number): string {
  return v >= 1000 ? `${(v / 1000).toFixed(2)} µs` : `${v.toFixed(1)} ns`;
}
