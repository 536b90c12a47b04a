// `snapload page-server`: its options (parser, schema and usage from one table).
import { type ConfigOf, defineCommand, intValue, logFormatOption, logLevelOption, metricsOption, optionalString, requiredString } from "./command.ts";

const options = {
  listen: { type: "string", schema: requiredString("HOST:PORT to listen on"), arg: "HOST:PORT", help: "address to listen on" },
  mem: { type: "string", schema: requiredString("the image to serve"), arg: "FILE", help: "raw or mapped-ram image to serve" },
  "token-file": {
    type: "string",
    schema: requiredString("the page server serves only clients that prove they hold this shared secret"),
    arg: "FILE", help: "shared secret clients must prove they hold",
  },
  ramblock: { type: "string", schema: optionalString(), arg: "NAME", help: "mapped-ram block to serve (as for serve)" },
  "handshake-timeout": {
    type: "string", schema: intValue(10, 600_000).default(5000), arg: "MS",
    help: "drop clients that have not authenticated by then (default 5000)",
  },
  "log-level": logLevelOption,
  "log-format": logFormatOption,
  metrics: metricsOption,
  // Exercises the clients' checksums: flips a payload byte of every Nth reply.
  "test-only-corrupt-every": {
    type: "string", schema: intValue(1, 1_000_000_000).optional(), arg: "N", hidden: true,
    help: "TEST ONLY: corrupt a payload byte of every Nth reply",
  },
} as const;

export const pageServer = defineCommand({
  name: "page-server",
  synopsis: "--listen HOST:PORT --mem FILE --token-file FILE [options]",
  summary: "Serve an image's pages over TCP to daemons started with --mem tcp://HOST:PORT (postcopy).\n" +
    "Clients must prove they hold the same --token-file secret. The channel is NOT encrypted:\n" +
    "use it on a trusted network or inside a tunnel.",
  options,
  run: async (config) => (await import("../page-server-command.ts")).pageServerCommand(config),
});
export type PageServerConfig = ConfigOf<typeof options>;
