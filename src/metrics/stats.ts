// `snapload stats`: a short table of a running daemon's live VMs, read from its metrics endpoint.
import { SnaploadError } from "../core/errors.ts";
import { parseExposition, type Sample } from "./exposition.ts";
import { quantileUs } from "./histogram.ts";

export interface VmRow {
  vm: string;
  pid: string;
  image: string;
  state: string;
  pagesServed: number;
  pages: number;
  faults: number;
  p50Us: number;
  p99Us: number;
}

export interface DaemonStats {
  vms: VmRow[];
  connected: number;
  served: number;
  detached: number;
  failed: number;
}

export async function fetchMetrics(url: string): Promise<string> {
  let res: Response;
  try {
    res = await fetch(url, { signal: AbortSignal.timeout(5000) });
  } catch (e) {
    throw new SnaploadError("PEER_GONE", `cannot reach ${url}: ${(e as { code?: string }).code ?? (e as Error).message}`, { url }, { cause: e });
  }
  if (!res.ok) throw new SnaploadError("PEER_GONE", `${url} answered HTTP ${res.status}`, { url, status: res.status });
  return await res.text();
}

/** The live VMs and lifecycle totals of a `serve --metrics` exposition. */
export function daemonStats(samples: Sample[]): DaemonStats {
  const one = (name: string) => samples.find((s) => s.name === name && Object.keys(s.labels).length === 0)?.value ?? 0;
  const perVm = (name: string, vm: string) => samples.find((s) => s.name === name && s.labels.vm === vm)?.value ?? 0;
  const vms = samples
    .filter((s) => s.name === "snapload_vm_info")
    .map((info) => {
      const vm = info.labels.vm ?? "";
      const buckets = samples.filter((s) => s.name === "snapload_vm_fault_service_seconds_bucket" && s.labels.vm === vm);
      const bounds = buckets.map((b) => (b.labels.le === "+Inf" ? Infinity : Number(b.labels.le) * 1e6));
      const cumulative = buckets.map((b) => b.value);
      return {
        vm,
        pid: info.labels.pid ?? "",
        image: info.labels.image ?? "",
        state: info.labels.state ?? "",
        pagesServed: perVm("snapload_vm_pages_served", vm),
        pages: perVm("snapload_vm_pages", vm),
        faults: perVm("snapload_vm_faults_total", vm),
        p50Us: quantileUs(bounds, cumulative, 0.5),
        p99Us: quantileUs(bounds, cumulative, 0.99),
      };
    });
  return {
    vms,
    connected: one("snapload_vms_connected_total"),
    served: one("snapload_vms_served_total"),
    detached: one("snapload_vms_detached_total"),
    failed: one("snapload_vms_failed_total"),
  };
}

/** A latency bucket bound, as the histogram knows it: "at most" this much. */
function latency(us: number): string {
  if (Number.isNaN(us)) return "-";
  if (us === Infinity) return ">16 s";
  if (us < 1000) return `≤${us} µs`;
  if (us < 1_000_000) return `≤${+(us / 1000).toPrecision(3)} ms`;
  return `≤${+(us / 1e6).toPrecision(3)} s`;
}

export function formatStats(url: string, s: DaemonStats): string {
  const head = `${url}: ${s.vms.length} VM${s.vms.length === 1 ? "" : "s"} connected; since start ${s.connected} connected, ${s.served} served, ${s.detached} detached, ${s.failed} failed`;
  if (s.vms.length === 0) return `${head}\n`;
  const rows = [["VM", "PID", "STATE", "PAGES SERVED/TOTAL", "FAULTS", "P50", "P99", "IMAGE"]];
  for (const v of s.vms) {
    const pct = v.pages > 0 ? ` (${Math.floor((100 * v.pagesServed) / v.pages)}%)` : "";
    rows.push([v.vm, v.pid, v.state, `${v.pagesServed}/${v.pages}${pct}`, String(v.faults), latency(v.p50Us), latency(v.p99Us), v.image]);
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const lines = rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join("  "));
  return `${head}\n${lines.join("\n")}\n`;
}

export async function statsCommand(address: string): Promise<number> {
  const url = `http://${address}/metrics`;
  const stats = daemonStats(parseExposition(await fetchMetrics(url)));
  process.stdout.write(formatStats(url, stats));
  return 0;
}
