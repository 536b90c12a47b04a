// `snapload push` and `snapload pull`: their options (parser, schema and usage from one table).
import { z } from "zod";
import { chunkSizeValue, endpointValue } from "./store-commands.ts";
import { byteSize, type ConfigOf, defineCommand, intValue, optionalString, switchValue } from "./command.ts";

const positional = (what: string, arg: string, help: string) =>
  ({ type: "string", positional: true, schema: z.string({ error: `needs ${what}` }).min(1, `needs ${what}`), arg, help }) as const;
const s3Endpoint = {
  type: "string", schema: endpointValue(), arg: "URL",
  help: "S3-compatible endpoint (Ceph RGW, MinIO, ...); path-style requests",
} as const;
const parallel = (what: string) => ({ type: "string", schema: intValue(1, 256).optional(), arg: "N", help: `${what} in flight (default 8)` }) as const;

const pushOptions = {
  file: positional("a FILE (raw image or QEMU mapped-ram file)", "FILE", "raw image or QEMU mapped-ram file"),
  target: positional("a STORE/NAME", "STORE/NAME", "file://DIR, s3://BUCKET[/PREFIX] or (read-only) http(s)://URL, then /NAME"),
  "chunk-size": { type: "string", schema: chunkSizeValue(), arg: "N", help: "256k|1m|2m|4m (default 256k)" },
  level: { type: "string", schema: intValue(1, 19).optional(), arg: "N", help: "zstd level (default 1)" },
  parallel: parallel("uploads"),
  ramblock: { type: "string", schema: optionalString(), arg: "NAME", help: "mapped-ram block to push (default: the largest)" },
  "working-set": { type: "string", schema: optionalString(), arg: "FILE", help: "a recorded working set (serve --record), prefetched first on restore" },
  "whole-file": { type: "boolean", schema: switchValue(), help: "push every byte of the file (a mapped-ram file whole, device state\nincluded: what qemu-restore --mem STORE/NAME needs)" },
  "s3-endpoint": s3Endpoint,
  "part-size": {
    type: "string", arg: "N", help: "s3://: objects above this go up in parts of this size,\n8 at once (default 8m; at least 5m)",
    schema: byteSize()
      .refine((n) => n >= 5 * 1024 * 1024, "must be at least 5m (S3's smallest part)")
      .optional(),
  },
} as const;

export const pushCmd = defineCommand({
  name: "push",
  synopsis: "FILE STORE/NAME [options]",
  summary: "Put a raw image or a QEMU mapped-ram file into a snapshot store: STORE is file://DIR,\n" +
    "s3://BUCKET[/PREFIX] (credentials from AWS_* or ~/.aws) or, read-only for serve/pull/inspect,\n" +
    "http(s)://URL. Chunks the store already holds are not uploaded again; the manifest is written last.",
  options: pushOptions,
  run: async (c) =>
    (await import("./store-commands.ts")).pushCommand({
      file: c.file, target: c.target, chunkSize: c["chunk-size"], level: c.level, parallel: c.parallel,
      ramblock: c.ramblock, wholeFile: c["whole-file"], workingSet: c["working-set"], s3Endpoint: c["s3-endpoint"], partSize: c["part-size"],
    }),
});
export type PushConfig = ConfigOf<typeof pushOptions>;

const pullOptions = {
  source: positional("a STORE/NAME", "STORE/NAME", "the stored snapshot"),
  file: positional("a FILE to write", "FILE", "the raw image to write"),
  parallel: parallel("downloads"),
  "s3-endpoint": s3Endpoint,
} as const;

export const pullCmd = defineCommand({
  name: "pull",
  synopsis: "STORE/NAME FILE [--s3-endpoint URL] [--parallel N]",
  summary: "Rebuild the raw image from a store (every chunk verified).",
  options: pullOptions,
  run: async (c) => (await import("./store-commands.ts")).pullCommand({ source: c.source, file: c.file, parallel: c.parallel, s3Endpoint: c["s3-endpoint"] }),
});
export type PullConfig = ConfigOf<typeof pullOptions>;
