// `snapload qemu-save`: takes the snapshot qemu-restore needs from a running QEMU — stop the
// guest, turn mapped-ram on, `migrate file:`, wait — and says what qemu-restore will make of it.
import { existsSync, statSync } from "node:fs";
import { resolve } from "node:path";
import type { QemuSaveConfig } from "./qemu-save.ts";
import { ConfigError } from "../core/errors.ts";
import { formatBytes } from "../core/log.ts";
import { MigrationError } from "../sinks/qemu/page-sink.ts";
import { EVENTS_CAPABILITY, waitMigrationFinalized, waitMigrationState } from "../sinks/qemu/migration-status.ts";
import { QmpClient } from "../sinks/qemu/qmp.ts";
import { readSnapshotStream } from "../sinks/qemu/snapshot-stream.ts";

export async function qemuSaveCommand(config: QemuSaveConfig, out: (s: string) => void = (s) => process.stdout.write(s)): Promise<number> {
  const path = resolve(config.out);
  if (existsSync(path)) throw new ConfigError(`${path} exists; qemu-save does not overwrite snapshots`);
  const qmp = await QmpClient.connect(config.qmp);
  try {
    const capsP = qmp.execute<{ capability: string; state: boolean }[]>("query-migrate-capabilities"); // pipelined with query-status
    capsP.catch(() => {});
    const before = await qmp.execute<{ status: string }>("query-status");
    const t0 = performance.now();
    if (before.status === "running") await qmp.execute("stop");
    // `events` too, so the end of the migration is a MIGRATION event rather than a poll; both are
    // left as we found them, so later migrations of this VM are unaffected.
    const eventsWere = (await capsP).some((c) => c.capability === "events" && c.state);
    await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "mapped-ram", state: true }, EVENTS_CAPABILITY] });
    let final: { status?: string; "error-desc"?: string };
    try {
      await qmp.execute("migrate", { uri: `file:${path}` });
      const m = await waitMigrationState(qmp, ["completed", "failed", "cancelled"], config.timeout);
      if (m.timedOut) {
        await qmp.execute("migrate_cancel");
        throw new MigrationError(`the snapshot did not complete within ${config.timeout} ms`);
      }
      final = m;
    } finally {
      await qmp
        .execute("migrate-set-capabilities", { capabilities: [{ capability: "mapped-ram", state: false }, { capability: "events", state: eventsWere }] })
        .catch(() => {});
    }
    if (final.status !== "completed") {
      throw new MigrationError(`QEMU could not save the snapshot: ${final["error-desc"] ?? final.status} (QEMU's stderr may say more)`);
    }
    const ms = performance.now() - t0;
    if (config.resume && before.status === "running") {
      await waitMigrationFinalized(qmp);
      await qmp.execute("cont");
    }
    const st = statSync(path);
    const stream = readSnapshotStream(path);
    const report = {
      path,
      sizeBytes: st.size,
      allocatedBytes: st.blocks * 512,
      timeMs: Math.round(ms * 1000) / 1000,
      machine: stream.machine,
      blocks: stream.ram.blocks.length,
      deviceStateBytes: stream.deviceEnd - stream.deviceStart,
      servable: stream.refusals.length === 0,
      refusals: stream.refusals,
      guest: config.resume && before.status === "running" ? "running" : "stopped",
    };
    if (config.json) out(`${JSON.stringify(report)}\n`);
    else {
      out(
        [
          `saved ${path} in ${ms.toFixed(1)} ms`,
          `  size: ${formatBytes(st.size)} (${formatBytes(report.allocatedBytes)} on disk), machine ${stream.machine}, ${report.blocks} RAM blocks, device state ${formatBytes(report.deviceStateBytes)}`,
          report.servable ? "  qemu-restore can serve it" : `  qemu-restore cannot serve it:\n    ${stream.refusals.join("\n    ")}`,
          report.guest === "running" ? "  the guest was resumed" : "  the guest is stopped: `cont` resumes it (or quit it)",
          "",
        ].join("\n"),
      );
    }
    return report.servable ? 0 : 1;
  } finally {
    qmp.close();
  }
}
