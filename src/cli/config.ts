// Command-line configuration, validated once at the edge (src/cli/*.ts: one table per command).
// Everything past here trusts its input.
export type { DemoConfig } from "./demo.ts";
export type { InspectConfig } from "./inspect.ts";
export type { PageServerConfig } from "./page-server.ts";
export type { ServeConfig } from "./serve.ts";

/**
 * Pages per fault unless told otherwise: the fastest N of the fault-around sweep (README, bench f)
 * that installs at most 2x the pages of a clustered working set; larger N are a little faster on
 * whole-image restores but fill guests with pages they never touch.
 */
export const DEFAULT_FAULT_AROUND = 16;
