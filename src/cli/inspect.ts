// `snapload inspect`: its options (parser, schema and usage from one table).
import { z } from "zod";
import { type ConfigOf, defineCommand, optionalString, switchValue } from "./command.ts";

const options = {
  file: { type: "string", positional: true, schema: z.string({ error: "inspect needs a FILE" }).min(1, "inspect needs a FILE"), arg: "FILE", help: "the image" },
  ramblock: { type: "string", schema: optionalString(), arg: "NAME", help: "describe this mapped-ram block (default: the largest)" },
  json: { type: "boolean", schema: switchValue(), help: "print JSON instead of text" },
} as const;

export const inspect = defineCommand({
  name: "inspect",
  synopsis: "FILE [--ramblock NAME] [--json]",
  summary:
    "Show an image's format, blocks, page size, and data vs zero pages; for mapped-ram files,\n" +
    "also what qemu-restore will do with it (machine, device state, servable or refused).",
  options,
  run: async (config) => {
    const { inspectImage } = await import("../inspect.ts");
    process.stdout.write(`${inspectImage(config.file, { ramblock: config.ramblock, json: config.json })}\n`);
    return 0;
  },
});
export type InspectConfig = ConfigOf<typeof options>;
