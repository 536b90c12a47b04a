// `snapload qemu-save`: its options (parser, schema and usage from one table).
import { type ConfigOf, defineCommand, intValue, requiredString, switchValue } from "./command.ts";

const options = {
  qmp: { type: "string", schema: requiredString("the running QEMU's QMP socket"), arg: "SOCKET", help: "the running QEMU's QMP socket" },
  out: { type: "string", schema: requiredString("the snapshot file to write"), arg: "FILE", help: "the snapshot file to write (never overwritten)" },
  resume: { type: "boolean", schema: switchValue(), help: "continue the guest once the snapshot is written" },
  timeout: { type: "string", schema: intValue(1, 86_400_000).default(600_000), arg: "MS", help: "cancel the snapshot if it takes longer (default 600000)" },
  json: { type: "boolean", schema: switchValue(), help: "print the report as JSON" },
} as const;

export const qemuSave = defineCommand({
  name: "qemu-save",
  synopsis: "--qmp SOCKET --out FILE [--resume] [--json]",
  summary:
    "Snapshot a running QEMU the way qemu-restore needs it: stop the guest, mapped-ram on,\n" +
    "migrate to FILE, wait; report size and time, and whether qemu-restore can serve it.",
  options,
});
export type QemuSaveConfig = ConfigOf<typeof options>;
