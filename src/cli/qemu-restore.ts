// `snapload qemu-restore`: its options (parser, schema and usage from one table).
import { z } from "zod";
import { endpointValue } from "./store-commands.ts";
import { type ConfigOf, defineCommand, intValue, logFormatOption, logLevelOption, optionalString, requiredString, switchValue } from "./command.ts";

const options = {
  mem: {
    type: "string", schema: requiredString("the mapped-ram snapshot file"), arg: "SNAPSHOT",
    help: "the mapped-ram snapshot (from qemu-save, or migrate file: with mapped-ram);\n" +
      "tcp://HOST:PORT: a page-server --whole-file serving it; STORE/NAME\n(file://, s3://, http(s)://): a store it was pushed to with --whole-file",
  },
  "token-file": { type: "string", schema: optionalString(), arg: "FILE", help: "the page server's shared secret (required with tcp://)" },
  "page-server-deadline": {
    type: "string", schema: intValue(100, 86_400_000).default(30_000), arg: "MS",
    help: "give up when the page server (or a store) delivers nothing this long\n(default 30000)",
  },
  "cache-dir": { type: "string", schema: optionalString(), arg: "DIR", help: "host chunk cache for stores (as for serve)" },
  "s3-endpoint": { type: "string", schema: endpointValue(), arg: "URL", help: "S3-compatible endpoint for s3:// (Ceph RGW, MinIO, ...), path-style" },
  qmp: { type: "string", schema: optionalString(), arg: "SOCKET", help: "the destination QEMU's QMP socket (-qmp unix:SOCKET,server=on,wait=off)" },
  to: {
    type: "string",
    schema: optionalString(),
    arg: "ADDR",
    help: "unix:PATH|tcp:HOST:PORT: with --qmp, the address for migrate-incoming;\nwithout, QEMU already listens there, with postcopy-ram (and\npostcopy-preempt) set by you",
  },
  // A switch that is on by default: `--no-preempt` turns it off (the parser's negation).
  preempt: {
    type: "boolean",
    schema: z.boolean().default(true),
    help: "requested pages on the postcopy-preempt channel (default);\n--no-preempt: on the main channel, between background sections",
  },
  "fault-around": { type: "string", schema: intValue(1, 512).default(1), arg: "N", help: "4 KiB pages sent per request, aligned window, data pages only\n(default 1)" },
  prefetch: { type: "string", schema: optionalString(), arg: "FILE", help: "send this recorded working set first, right after the device state" },
  record: { type: "string", schema: optionalString(), arg: "FILE", help: "write the order of the guest's page requests (a working set)" },
  "send-zero-pages": {
    type: "boolean",
    schema: switchValue(),
    help: "also stream zero pages (as ZERO records), as QEMU's own source does;\ndefault: only on request, the rest read as zero after completion",
  },
  "background-rate": { type: "string", schema: intValue(1, 1_000_000).optional(), arg: "MIB", help: "cap the background stream at MIB MiB/s (requests are never capped)" },
  "completion-timeout": { type: "string", schema: intValue(1, 86_400_000).default(600_000), arg: "MS", help: "give up when the restore has not completed by then (default 600000)" },
  json: { type: "boolean", schema: switchValue(), help: "print the summary as JSON" },
  "log-level": logLevelOption,
  "log-format": logFormatOption,
} as const;

export const qemuRestore = defineCommand({
  name: "qemu-restore",
  synopsis: "--mem SNAPSHOT --qmp SOCKET [options]",
  summary:
    "Restore a QEMU guest from a mapped-ram snapshot into a QEMU started with the same command\n" +
    "line plus -incoming defer (unmodified QEMU: snapload is its postcopy migration source).\n" +
    "The guest runs at once; its RAM follows on request and in the background.",
  options,
  checks: [{ ok: (c) => c.qmp !== undefined || c.to !== undefined, option: "qmp", message: "is required (or --to ADDR if you drive QMP yourself)" }],
});
export type QemuRestoreConfig = ConfigOf<typeof options>;
