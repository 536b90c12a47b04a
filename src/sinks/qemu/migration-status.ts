// Waiting for a QEMU migration (either side) to reach a state, on QEMU's MIGRATION events rather
// than by polling query-migrate. QEMU sends MIGRATION only with the `events` migration capability on.
import { QmpError, type QmpClient } from "./qmp.ts";

export interface MigrationInfo {
  status?: string;
  "error-desc"?: string;
}

/** The capability to set (with the others, before migrate / migrate-incoming) so waitMigrationState can wait. */
export const EVENTS_CAPABILITY = { capability: "events", state: true } as const;

/**
 * Resolves with query-migrate's answer once the status is one of `states`, or with the answer at
 * the deadline (`timedOut`). Asks once, then waits for a MIGRATION event: an event that arrives
 * between the question and the wait is in the client's buffer (marked before asking).
 */
export async function waitMigrationState(qmp: QmpClient, states: readonly string[], timeoutMs: number): Promise<MigrationInfo & { timedOut: boolean }> {
  const since = qmp.eventMark;
  const infoP = qmp.execute<MigrationInfo>("query-migrate");
  const capsP = qmp.execute<{ capability: string; state: boolean }[]>("query-migrate-capabilities");
  capsP.catch(() => {});
  const info = await infoP;
  if (states.includes(info.status ?? "none")) return { ...info, timedOut: false };
  if (!(await capsP).some((c) => c.capability === "events" && c.state)) {
    throw new QmpError(`QMP ${qmp.path}: cannot wait for the migration (now "${info.status ?? "none"}"): the "events" migration capability is off, so QEMU sends no MIGRATION events`, {
      path: qmp.path,
      status: info.status,
    });
  }
  try {
    await qmp.waitEvent("MIGRATION", (d) => states.includes(String(d.status)), timeoutMs, since);
  } catch (e) {
    if (!(e instanceof QmpError && e.context.timedOut === true)) throw e;
    return { ...(await qmp.execute<MigrationInfo>("query-migrate")), timedOut: true };
  }
  // The event has the status only; query-migrate adds error-desc.
  return { ...(await qmp.execute<MigrationInfo>("query-migrate")), timedOut: false };
}

/**
 * Resolves with the run state once a source whose outgoing migration completed has left
 * `finish-migrate`. QEMU sends MIGRATION `completed` before its cleanup moves the run state on to
 * `postmigrate`, and refuses `cont` until then ("Migration is not finalized yet"). No event marks
 * that step, so this asks query-status (every 2 ms, until `timeoutMs`).
 */
export async function waitMigrationFinalized(qmp: QmpClient, timeoutMs = 5000): Promise<string> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const { status } = await qmp.execute<{ status: string }>("query-status");
    if (status !== "finish-migrate") return status;
    if (performance.now() > deadline) {
      throw new QmpError(`QMP ${qmp.path}: the migration completed but QEMU was still finalizing it after ${timeoutMs} ms (run state finish-migrate)`, { path: qmp.path, status });
    }
    await Bun.sleep(2);
  }
}
