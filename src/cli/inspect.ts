// `snapload inspect`: its options (parser, schema and usage from one table).
import { z } from "zod";
import { endpointValue } from "./store-commands.ts";
import { type ConfigOf, defineCommand, optionalString, switchValue } from "./command.ts";

const options = {
  file: { type: "string", positional: true, schema: z.string({ error: "inspect needs a FILE" }).min(1, "inspect needs a FILE"), arg: "FILE|STORE/NAME", help: "the image, or a stored snapshot (see push)" },
  ramblock: { type: "string", schema: optionalString(), arg: "NAME", help: "describe this mapped-ram block (default: the largest)" },
  json: { type: "boolean", schema: switchValue(), help: "print JSON instead of text" },
  "s3-endpoint": { type: "string", schema: endpointValue(), arg: "URL", help: "S3-compatible endpoint, for s3:// snapshots" },
} as const;

export const inspect = defineCommand({
  name: "inspect",
  synopsis: "FILE|STORE/NAME [--ramblock NAME] [--json]",
  summary: "Show an image's format, blocks, page size, and data vs zero pages (for mapped-ram files,\n" +
    "also what qemu-restore will do with it); or a stored snapshot's geometry, chunks, stored vs\n" +
    "logical bytes, dedup and compression.",
  options,
  run: async (config) => {
    if ((await import("../sources/store/stores.ts")).isStoreUrl(config.file)) {
      return (await import("./store-commands.ts")).inspectStoreCommand({ name: config.file, json: config.json, s3Endpoint: config["s3-endpoint"] });
    }
    const { inspectImage } = await import("./inspect-file.ts");
    process.stdout.write(`${inspectImage(config.file, { ramblock: config.ramblock, json: config.json })}\n`);
    return 0;
  },
});
export type InspectConfig = ConfigOf<typeof options>;
