// Prometheus text exposition format (version 0.0.4): families of samples, each announced once by
// HELP and TYPE, histograms as cumulative _bucket{le} plus _sum and _count.
import { bucketBoundUs, LATENCY_BUCKETS } from "./histogram.ts";

export type Labels = Record<string, string | number>;

const escapeLabel = (v: string) => v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
const escapeHelp = (v: string) => v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");

function labelText(labels: Labels | undefined, extra?: string): string {
  const parts = labels ? Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(String(v))}"`) : [];
  if (extra) parts.push(extra);
  return parts.length ? `{${parts.join(",")}}` : "";
}

function num(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "-Inf";
  return String(v);
}

/** The `le` of each latency bucket, in seconds. */
export const LATENCY_LE: readonly string[] = Array.from({ length: LATENCY_BUCKETS }, (_, b) => {
  const us = bucketBoundUs(b);
  return us === Infinity ? "+Inf" : String(us / 1e6);
});

export class Exposition {
  private readonly lines: string[] = [];

  /** Starts a family; its samples must follow before the next family. */
  family(name: string, type: "counter" | "gauge" | "histogram", help: string): this {
    this.lines.push(`# HELP ${name} ${escapeHelp(help)}`, `# TYPE ${name} ${type}`);
    return this;
  }

  sample(name: string, labels: Labels | undefined, value: number): this {
    this.lines.push(`${name}${labelText(labels)} ${num(value)}`);
    return this;
  }

  /** A latency histogram (histogram.ts slots, µs) as seconds. */
  histogram(name: string, labels: Labels | undefined, h: Float64Array): this {
    let cumulative = 0;
    for (let b = 0; b < LATENCY_BUCKETS; b++) {
      cumulative += h[b]!;
      this.lines.push(`${name}_bucket${labelText(labels, `le="${LATENCY_LE[b]}"`)} ${num(cumulative)}`);
    }
    this.lines.push(`${name}_sum${labelText(labels)} ${num(h[LATENCY_BUCKETS]! / 1e6)}`);
    this.lines.push(`${name}_count${labelText(labels)} ${num(h[LATENCY_BUCKETS + 1]!)}`);
    return this;
  }

  text(): string {
    return `${this.lines.join("\n")}\n`;
  }
}

/** One sample of a scraped exposition. */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Parses the text format's samples (comments skipped): enough for `snapload stats` and tests. */
export function parseExposition(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    if (m[3]) {
      for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[l[1]!] = l[2]!.replace(/\\(.)/g, (_, c: string) => (c === "n" ? "\n" : c));
      }
    }
    const v = m[4]!;
    out.push({ name: m[1]!, labels, value: v === "+Inf" ? Infinity : v === "-Inf" ? -Infinity : Number(v) });
  }
  return out;
}
