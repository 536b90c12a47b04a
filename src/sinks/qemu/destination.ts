// Checks a QEMU destination over QMP before anything is sent: it waits for an incoming migration,
// runs the snapshot's machine type, and has the snapshot's RAM blocks (names, sizes, page sizes).
// On any mismatch nothing has been changed on the destination.
import { SnaploadError } from "../../core/errors.ts";
import type { StreamBlock } from "./stream.ts";
import { TARGET_PAGE } from "./stream.ts";
import type { QmpClient } from "./qmp.ts";
import type { SnapshotStream } from "./snapshot-stream.ts";

export class MismatchError extends SnaploadError {
  constructor(message: string, context: Record<string, unknown> = {}) {
    super("QEMU_MISMATCH", message, context);
    this.name = "MismatchError";
  }
}

export interface DestBlock {
  name: string;
  pageSize: number;
  used: number;
  total: number;
}

const UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1 << 20, GiB: 1 << 30 };

/** Parses `info ramblock` / x-query-ramblock: name, PSize, offset, used, total, ... */
export function parseRamblockTable(text: string): DestBlock[] {
  const out: DestBlock[] = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^\s*(\S+)\s+(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)\s+0x[0-9a-fA-F]+\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)/);
    if (!m) continue;
    out.push({ name: m[1]!, pageSize: Math.round(Number(m[2]) * UNITS[m[3]!]!), used: Number.parseInt(m[4]!, 16), total: Number.parseInt(m[5]!, 16) });
  }
  return out;
}

export interface DestinationPlan {
  /** The stream's block list, with per-block page sizes where the destination needs them. */
  blocks: StreamBlock[];
  /** OR of the destination's block page sizes (POSTCOPY_ADVISE). */
  pageSizeSummary: number;
  /** Destination blocks the snapshot does not have (they stay zero). */
  extra: string[];
}

/** Compares the snapshot with the destination's blocks; pure, so it is testable without QEMU. */
export function planBlocks(stream: SnapshotStream, dest: DestBlock[], hostPage = TARGET_PAGE): DestinationPlan {
  const byName = new Map(dest.map((d) => [d.name, d]));
  const problems: string[] = [];
  const blocks: StreamBlock[] = [];
  for (const b of stream.ram.blocks) {
    const d = byName.get(b.name);
    if (!d) {
      problems.push(`RAM block "${b.name}" (${b.usedLength} bytes) does not exist on the destination`);
      continue;
    }
    // Only resizable blocks (ACPI ROMs: used < total) may differ in length (QEMU's rule).
    const resizable = d.total > d.used;
    if (d.used !== b.usedLength && !(resizable && b.usedLength <= d.total)) {
      problems.push(`RAM block "${b.name}" is ${b.usedLength} bytes in the snapshot but ${d.used} on the destination (started with a different -m or devices?)`);
      continue;
    }
    if (d.pageSize > TARGET_PAGE) {
      problems.push(`RAM block "${b.name}" uses ${d.pageSize}-byte pages on the destination; huge-page-backed RAM is not supported by qemu-restore yet`);
      continue;
    }
    const sb: StreamBlock = { name: b.name, usedLength: b.usedLength };
    if (d.pageSize !== Math.max(hostPage, TARGET_PAGE)) sb.pageSize = d.pageSize;
    blocks.push(sb);
  }
  if (problems.length > 0) {
    throw new MismatchError(`the destination does not match the snapshot (nothing was sent):\n  ${problems.join("\n  ")}`, { problems });
  }
  const names = new Set(stream.ram.blocks.map((b) => b.name));
  return {
    blocks,
    pageSizeSummary: dest.reduce((acc, d) => acc | d.pageSize, 0),
    extra: dest.filter((d) => !names.has(d.name)).map((d) => d.name),
  };
}

/** Runs every read-only check; throws MismatchError / QmpError with the reason. */
export async function checkDestination(qmp: QmpClient, stream: SnapshotStream): Promise<DestinationPlan> {
  // Every query is read-only: sent together (QMP answers in order), one round trip instead of
  // five; the answers are then checked in the order a user fixes them.
  const statusP = qmp.execute<{ status: string }>("query-status");
  const migP = qmp.execute<{ status?: string }>("query-migrate");
  const typeP = qmp.execute<string>("qom-get", { path: "/machine", property: "type" });
  const capsP = qmp.execute<{ capability: string; state: boolean }[]>("query-migrate-capabilities");
  const tableP = qmp.execute<{ "human-readable-text": string }>("x-query-ramblock");
  // Awaited in order below; a later failure must not go unhandled when an earlier check throws.
  for (const p of [migP, typeP, capsP, tableP]) p.catch(() => {});
  const status = await statusP;
  if (status.status !== "inmigrate") {
    throw new MismatchError(
      `the destination is "${status.status}", not waiting for an incoming migration: start QEMU with -incoming defer`,
      { status: status.status },
    );
  }
  const mig = await migP;
  if (mig.status !== undefined && mig.status !== "none") {
    throw new MismatchError(`the destination already has a migration in state "${mig.status}": start a fresh QEMU with -incoming defer`, {
      status: mig.status,
    });
  }
  const machine = (await typeP).replace(/-machine$/, "");
  if (machine !== stream.machine) {
    throw new MismatchError(`machine type mismatch: the snapshot is ${stream.machine}, the destination runs ${machine} (use -machine ${stream.machine})`, {
      snapshot: stream.machine,
      destination: machine,
    });
  }
  const bad = (await capsP).filter((c) => c.state && ["mapped-ram", "x-ignore-shared", "multifd"].includes(c.capability)).map((c) => c.capability);
  if (bad.length > 0) {
    throw new MismatchError(`the destination has migration capabilities on that postcopy cannot use: ${bad.join(", ")} (turn them off)`, { bad });
  }
  return planBlocks(stream, parseRamblockTable((await tableP)["human-readable-text"]));
}
