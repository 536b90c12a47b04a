// What `serve --metrics` exposes. The fault path only bumps typed arrays it already owns (per VM:
// PageInstaller.pages, VmSession.latency, VmSession.stats); totals are summed when scraped, from
// the live VMs (their supervisors) plus what closed VMs left in VmTotals.
import { HOW_NAMES, KIND_NAMES } from "../sinks/uffd/page-installer.ts";
import type { VmSession } from "../daemon/vm-session.ts";
import { Exposition } from "./exposition.ts";
import { addHistogram, histogramSumUs, newHistogram } from "./histogram.ts";

/** Label `source`: where a VM's pages come from. */
export const SOURCE_NAMES = ["image", "page_server"] as const;
const sourceOf = (vm: VmSession) => (vm.remote ? 1 : 0);

/** A connected VM as the endpoint sees it (its VmSupervisor). */
export interface LiveVm {
  readonly pid: number;
  readonly detached: boolean;
  readonly session: VmSession;
}

/** Lifecycle counters, and the counters of VMs that are gone. */
export class VmTotals {
  connected = 0;
  served = 0;
  detached = 0;
  failed = 0;
  rejected = 0;
  readonly faults = new Float64Array(SOURCE_NAMES.length);
  readonly dataBytes = new Float64Array(SOURCE_NAMES.length);
  readonly latency = SOURCE_NAMES.map(() => newHistogram());
  readonly pages = new Float64Array(HOW_NAMES.length * KIND_NAMES.length);
  prefetchHit = 0;
  prefetchLate = 0;

  /** Folds a closing VM's counters into the totals (once, when it is forgotten). */
  retire(vm: VmSession): void {
    const s = sourceOf(vm);
    this.faults[s]! += vm.stats.faults;
    this.dataBytes[s]! += vm.stats.bytesCopied;
    addHistogram(this.latency[s]!, vm.latency);
    const p = vm.installer.pages;
    for (let i = 0; i < p.length; i++) this.pages[i]! += p[i]!;
    this.prefetchHit += vm.stats.prefetchedPages;
    this.prefetchLate += vm.stats.prefetchLate;
  }
}

/** Renders the exposition from the totals and the VMs connected now. */
export function renderServeMetrics(totals: VmTotals, live: Iterable<LiveVm>): string {
  const owners = [...live];
  const vms = owners.map((o) => o.session);
  const faults = Float64Array.from(totals.faults);
  const dataBytes = Float64Array.from(totals.dataBytes);
  const latency = totals.latency.map((h) => Float64Array.from(h));
  const pages = Float64Array.from(totals.pages);
  let prefetchHit = totals.prefetchHit;
  let prefetchLate = totals.prefetchLate;
  for (const vm of vms) {
    const s = sourceOf(vm);
    faults[s]! += vm.stats.faults;
    dataBytes[s]! += vm.stats.bytesCopied;
    addHistogram(latency[s]!, vm.latency);
    const p = vm.installer.pages;
    for (let i = 0; i < p.length; i++) pages[i]! += p[i]!;
    prefetchHit += vm.stats.prefetchedPages;
    prefetchLate += vm.stats.prefetchLate;
  }

  const x = new Exposition();
  x.family("snapload_vms_connected_total", "counter", "VMs whose handshake was accepted.").sample("snapload_vms_connected_total", undefined, totals.connected);
  x.family("snapload_vms_served_total", "counter", "VMs served until their VMM went away (or snapload shut down), without a failure.")
    .sample("snapload_vms_served_total", undefined, totals.served);
  x.family("snapload_vms_detached_total", "counter", "VMs whose every page was installed, then unregistered (they no longer need snapload).")
    .sample("snapload_vms_detached_total", undefined, totals.detached);
  x.family("snapload_vms_failed_total", "counter", "VMs that could no longer be served (killed or dropped, --on-fatal).")
    .sample("snapload_vms_failed_total", undefined, totals.failed);
  x.family("snapload_vms_active", "gauge", "VMs connected now (served or detached).").sample("snapload_vms_active", undefined, vms.length);
  x.family("snapload_handshakes_rejected_total", "counter", "Connections refused before serving (bad handshake, regions past the image, ...).")
    .sample("snapload_handshakes_rejected_total", undefined, totals.rejected);

  x.family("snapload_faults_total", "counter", "Page faults served (each waiting vCPU counts), by where pages come from.");
  SOURCE_NAMES.forEach((source, i) => x.sample("snapload_faults_total", { source }, faults[i]!));
  x.family("snapload_pages_installed_total", "counter", "Pages installed into guests, by how they were asked for and what they held.");
  HOW_NAMES.forEach((how, h) => KIND_NAMES.forEach((kind, k) => x.sample("snapload_pages_installed_total", { how, kind }, pages[h * KIND_NAMES.length + k]!)));
  x.family("snapload_data_bytes_total", "counter", "Bytes of page data installed, by where they came from: read from the image, or received from a page server.");
  SOURCE_NAMES.forEach((source, i) => x.sample("snapload_data_bytes_total", { source }, dataBytes[i]!));
  x.family("snapload_fault_service_seconds", "histogram", "Time from reading a fault to its page in place, per waiting vCPU (power-of-two microsecond buckets).");
  SOURCE_NAMES.forEach((source, i) => x.histogram("snapload_fault_service_seconds", { source }, latency[i]!));
  x.family("snapload_prefetch_pages_total", "counter", "Pages of a --prefetch working set: hit = installed before the guest touched them, late = the guest faulted first. Hit rate: hit / (hit + late).");
  x.sample("snapload_prefetch_pages_total", { outcome: "hit" }, prefetchHit);
  x.sample("snapload_prefetch_pages_total", { outcome: "late" }, prefetchLate);

  // Per VM, only while it is connected: the label set stays as small as the live VMs.
  x.family("snapload_vm_info", "gauge", "A connected VM: its VMM's pid, its image, and whether it is served or detached.");
  for (const o of owners) {
    const vm = o.session;
    x.sample("snapload_vm_info", { vm: vm.id, pid: o.pid, image: vm.table.regions[0]?.backend.description ?? "", state: o.detached ? "detached" : "serving" }, 1);
  }
  x.family("snapload_vm_pages", "gauge", "Pages of a connected VM's regions (of its page size).");
  for (const vm of vms) x.sample("snapload_vm_pages", { vm: vm.id }, vm.table.totalPages);
  x.family("snapload_vm_pages_served", "gauge", "Pages of a connected VM that are in place (installed, or discarded by the guest).");
  for (const vm of vms) x.sample("snapload_vm_pages_served", { vm: vm.id }, vm.table.settledPages);
  x.family("snapload_vm_faults_total", "counter", "Faults served for a connected VM.");
  for (const vm of vms) x.sample("snapload_vm_faults_total", { vm: vm.id }, vm.stats.faults);
  x.family("snapload_vm_blocktime_seconds_total", "counter", "Total time a connected VM's vCPUs waited on faults, from their read to their page in place.");
  for (const vm of vms) x.sample("snapload_vm_blocktime_seconds_total", { vm: vm.id }, histogramSumUs(vm.latency) / 1e6);
  x.family("snapload_vm_fault_service_seconds", "histogram", "A connected VM's fault service time (as snapload_fault_service_seconds).");
  for (const vm of vms) x.histogram("snapload_vm_fault_service_seconds", { vm: vm.id }, vm.latency);
  return x.text();
}
