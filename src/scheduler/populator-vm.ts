// What the populator needs of the VM it fills: its page table, a few counters, the guest's last
// fault (where the sweep continues), and the sink's install and wake. Declared here, by the
// scheduler, so the scheduler does not depend on the daemon; the daemon's VmSession satisfies it.
import type { InstallOutcome } from "../sources/port.ts";
import type { HandlerTable, Region } from "./handler-table.ts";

export interface PopulatorVm {
  readonly table: Pick<HandlerTable, "regions" | "settledPages" | "complete">;
  readonly stats: {
    /** Faults served so far (read: a change means the guest faulted since the last look). */
    readonly faults: number;
    prefetchLate: number;
    prefetchedPages: number;
    populatedPages: number;
  };
  /** Where the guest last faulted: the region, and the page after the faulting run. */
  readonly lastFaultRegion: Region | undefined;
  readonly lastFaultPage: number;
  /** Installs missing pages of [from, to) of `region`, as `how` (HOW_*: counted by how asked for). */
  installMissing(region: Region, from: number, to: number, budget: number, how?: number): InstallOutcome;
  /** Wakes vCPUs waiting on region pages [lo, hi). */
  wake(region: Region, lo: number, hi: number): void;
}
