// `snapload page-server`: its options (parser, schema and usage from one table).
import { endpointValue } from "./store-commands.ts";
import { byteSize, type ConfigOf, defineCommand, intValue, logFormatOption, logLevelOption, metricsOption, optionalString, requiredString, switchValue } from "./command.ts";

const options = {
  listen: { type: "string", schema: requiredString("HOST:PORT to listen on"), arg: "HOST:PORT", help: "address to listen on" },
  mem: {
    type: "string", schema: requiredString("the image to serve"), arg: "FILE",
    help: "raw or mapped-ram image to serve, or STORE/NAME: a snapshot in a store\n" +
      "(file://DIR, s3://BUCKET[/PREFIX], http(s)://URL) fronted for a rack: chunks\n" +
      "fetched once through the host cache, verified before any page is sent",
  },
  "token-file": {
    type: "string",
    schema: requiredString("the page server serves only clients that prove they hold this shared secret"),
    arg: "FILE", help: "shared secret clients must prove they hold",
  },
  ramblock: { type: "string", schema: optionalString(), arg: "NAME", help: "mapped-ram block to serve (as for serve)" },
  "whole-file": { type: "boolean", schema: switchValue(), help: "serve every byte of the file (a mapped-ram file whole, for\nqemu-restore --mem tcp://)" },
  // Short: an unauthenticated connection holds an fd, and anyone can open one.
  "handshake-timeout": {
    type: "string", schema: intValue(10, 600_000).default(2000), arg: "MS",
    help: "drop clients that have not authenticated by then (default 2000)",
  },
  "max-preauth": {
    type: "string", schema: intValue(1, 1_000_000).default(256), arg: "N",
    help: "unauthenticated connections held at once (default 256) ...",
  },
  "max-preauth-per-address": {
    type: "string", schema: intValue(1, 1_000_000).default(32), arg: "N",
    help: "... and from one address (default 32); past either the\noldest idle one is dropped",
  },
  "max-clients": {
    type: "string", schema: intValue(1, 1_000_000).default(1024), arg: "N",
    help: "authenticated connections at once (default 1024)",
  },
  // with --mem STORE/NAME (as for serve)
  "cache-dir": { type: "string", schema: optionalString(), arg: "DIR", help: "host chunk cache (as for serve)" },
  "cache-size": {
    type: "string", arg: "N", help: "cache size in bytes, or with k/m/g/t (default 10g)",
    schema: byteSize().optional(),
  },
  "s3-endpoint": { type: "string", schema: endpointValue(), arg: "URL", help: "S3-compatible endpoint for s3:// (as for serve)" },
  "store-parallel": { type: "string", schema: intValue(1, 256).optional(), arg: "N", help: "chunk GETs in flight (default 16)" },
  "store-deadline": {
    type: "string", schema: intValue(100, 86_400_000).default(30_000), arg: "MS",
    help: "a chunk not obtainable this long fails the requests that need it\n(default 30000)",
  },
  "log-level": logLevelOption,
  "log-format": logFormatOption,
  metrics: metricsOption,
} as const;

export const pageServer = defineCommand({
  name: "page-server",
  synopsis: "--listen HOST:PORT --mem FILE --token-file FILE [options]",
  summary: "Serve an image's pages over TCP to daemons started with --mem tcp://HOST:PORT (postcopy).\n" +
    "Clients must prove they hold the same --token-file secret; after that handshake every\n" +
    "byte is encrypted and authenticated (AES-256-GCM, fresh keys per connection).",
  options,
});
export type PageServerConfig = ConfigOf<typeof options>;
