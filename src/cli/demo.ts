// `snapload demo`: its options (parser, schema and usage from one table).
import { type ConfigOf, defineCommand, intValue, optionalString, switchValue } from "./command.ts";

const options = {
  "size-mib": { type: "string", schema: intValue(4, 65536).default(256), arg: "N", help: "image size in MiB (default 256)" },
  threads: { type: "string", schema: intValue(1, 64).default(2), arg: "N", help: "vCPU threads of the stand-in VM (default 2)" },
  "fault-around": { type: "string", schema: intValue(1, 512).default(16), arg: "N", help: "pages installed per fault (default 16)" },
  dir: { type: "string", schema: optionalString(), arg: "DIR", help: "work directory, kept (default: a temporary one, removed)" },
  keep: { type: "boolean", schema: switchValue(), help: "keep the temporary work directory" },
} as const;

export const demo = defineCommand({
  name: "demo",
  synopsis: "[--size-mib N] [--threads N] [--fault-around N] [--dir DIR] [--keep]",
  summary: "Make a demo image, serve it, restore a stand-in VM from it and verify every page.",
  options,
});
export type DemoConfig = ConfigOf<typeof options>;
