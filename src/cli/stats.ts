// `snapload stats`: its options (parser, schema and usage from one table).
import { defineCommand, requiredString } from "./command.ts";

const options = {
  metrics: {
    type: "string",
    schema: requiredString("the --metrics HOST:PORT of a running serve").regex(/^(\[[0-9a-fA-F:.]+\]|[^:[\]\s/]+):\d{1,5}$/, "must be HOST:PORT (IPv6 as [ADDR]:PORT)"),
    arg: "HOST:PORT",
    help: "the daemon's --metrics address",
  },
} as const;

export const stats = defineCommand({
  name: "stats",
  synopsis: "--metrics HOST:PORT",
  summary: "A running daemon's live VMs: pid, state, pages served/total, faults, fault service\n" +
    "time p50/p99 (power-of-two buckets: an upper bound), image.",
  options,
  run: async (config) => (await import("../metrics/stats.ts")).statsCommand(config.metrics),
});
