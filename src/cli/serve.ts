// `snapload serve`: its options (parser, schema and usage from one table).
import { z } from "zod";
import { DEFAULT_FAULT_AROUND } from "./config.ts";
import { endpointValue } from "./store-commands.ts";
import { byteSize, type ConfigOf, defineCommand, intValue, logFormatOption, logLevelOption, metricsOption, optionalString, repeatedString } from "./command.ts";

const options = {
  socket: {
    type: "string", multiple: true, schema: repeatedString("the Unix socket VMMs connect to"), arg: "PATH",
    help: "Unix socket VMMs connect to (repeat to serve several images)",
  },
  mem: {
    type: "string", multiple: true, schema: repeatedString("the image to serve"), arg: "FILE",
    help: "raw or mapped-ram image; one for all sockets, or one per --socket\n" +
      "tcp://HOST:PORT: fetch pages from a page server instead (postcopy; see\n" +
      "page-server); every page not touched yet is pulled in the background, then\n" +
      "the VM is detached\n" +
      "STORE/NAME: a snapshot in a store (file://DIR, s3://BUCKET[/PREFIX],\n" +
      "http(s)://URL; see push): chunks fetched on demand, verified, kept in the\n" +
      "host cache; the snapshot's recorded working set is prefetched first",
  },
  ramblock: { type: "string", schema: optionalString(), arg: "NAME", help: "mapped-ram block to serve (default: the largest, the guest RAM)" },
  "socket-mode": {
    type: "string",
    schema: z.string().regex(/^0?[0-7]{3}$/, "must be an octal mode such as 0600").transform((s) => Number.parseInt(s, 8)).default(0o600),
    arg: "MODE", help: "socket file mode (default 0600)",
  },
  "fault-around": {
    type: "string", schema: intValue(1, 512).optional(), arg: "N",
    help: `4 KiB pages installed per fault, aligned window (default ${DEFAULT_FAULT_AROUND}, or 1\n` +
      "with --record; 1 = one page per fault, Firecracker's on_demand;\n" +
      "on 2 MiB pages the window is N x 4 KiB, at least one page)",
  },
  "spin-us": {
    type: "string", schema: intValue(0, 10_000).default(50), arg: "N",
    help: "after serving a fault, poll up to N µs for the next one before sleeping\n" +
      "(default 50), yielding the CPU between polls; stops while spins catch\n" +
      "nothing and probes again later; 0 = never",
  },
  "handshake-timeout": {
    type: "string", schema: intValue(10, 600_000).default(5000), arg: "MS",
    help: "drop peers that have not sent their handshake by then (default 5000)",
  },
  "on-fatal": {
    type: "string", schema: z.enum(["kill", "drop"]).default("kill"), arg: "kill|drop",
    help: "a VM that can no longer be served is killed (SIGKILL) or dropped (default kill)",
  },
  prefetch: { type: "string", schema: optionalString(), arg: "FILE", help: "install this recorded working set as soon as a VM connects (faults first)" },
  populate: {
    type: "string", schema: z.enum(["none", "background"]).optional(), arg: "MODE",
    help: "none: pure on demand; background: install every page left, then\n" +
      "unregister the VM (detach) (default none; background for tcp://)",
  },
  record: {
    type: "string", schema: optionalString(), arg: "FILE",
    help: "write each VM's first-touch order when it exits and on SIGUSR1;\n" +
      "{vm} and {pid} in FILE are replaced (else the last writer wins)",
  },
  "log-level": logLevelOption,
  "log-format": logFormatOption,
  metrics: metricsOption,
  "token-file": { type: "string", schema: optionalString(), arg: "FILE", help: "the page server's shared secret (required with tcp://)" },
  "page-server-deadline": {
    type: "string", schema: intValue(100, 86_400_000).default(30_000), arg: "MS",
    help: "a VM whose page server stays unreachable this long is killed\n(default 30000); also the deadline for a chunk from a store",
  },
  // object stores (src/store/)
  "cache-dir": {
    type: "string", schema: optionalString(), arg: "DIR",
    help: "host chunk cache, shared by every daemon (default /var/cache/snapload\nas root, else $TMPDIR/snapload)",
  },
  "cache-size": {
    type: "string", arg: "N", help: "cache size in bytes, or with k/m/g/t (default 10g); LRU eviction",
    schema: byteSize().optional(),
  },
  "s3-endpoint": { type: "string", schema: endpointValue(), arg: "URL", help: "S3-compatible endpoint for s3:// (Ceph RGW, MinIO, ...), path-style" },
  "store-parallel": { type: "string", schema: intValue(1, 256).optional(), arg: "N", help: "chunk GETs in flight per daemon (default 16)" },
} as const;

export const serve = defineCommand({
  name: "serve",
  synopsis: "--socket PATH --mem FILE [options]",
  summary: "Serve Firecracker-style VMMs that connect to PATH, from a raw memory file or a\n" +
    "QEMU mapped-ram file (detected from its QEVM header). Repeat --socket (and --mem)\n" +
    "to serve several images from one daemon: sockets and images pair up in order.",
  options,
  checks: [{
    ok: (c) => c.mem.length === 1 || c.mem.length === c.socket.length,
    option: "mem",
    message: "give one --mem for all sockets, or one --mem per --socket (paired in order)",
  }],
});
export type ServeConfig = ConfigOf<typeof options>;
