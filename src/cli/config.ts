// Command-line defaults shared by a command's table and its implementation. Configuration is
// validated once at the edge (src/cli/*.ts: one table per command, which also exports its
// config type); everything past there trusts its input.

/**
 * Pages per fault unless told otherwise: the fastest N of the fault-around sweep (README, bench f)
 * that installs at most 2x the pages of a clustered working set; larger N are a little faster on
 * whole-image restores but fill guests with pages they never touch.
 */
export const DEFAULT_FAULT_AROUND = 16;
