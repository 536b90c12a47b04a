// The part of `snapload inspect` that says what `qemu-restore` will do with a mapped-ram file.
import { SnaploadError } from "../../core/errors.ts";
import { readSnapshotStream } from "./snapshot-stream.ts";

export interface QemuRestorePlan {
  servable: boolean;
  refusals: string[];
  machine?: string;
  capabilities?: string[];
  ramSectionId?: number;
  deviceStateBytes?: number;
  deviceSections?: number;
  /** Every block is sent: the destination wipes all of them at ADVISE, ROMs included. */
  blocks?: string[];
}

export function qemuRestorePlan(path: string): QemuRestorePlan {
  try {
    const s = readSnapshotStream(path);
    return {
      servable: s.refusals.length === 0,
      refusals: s.refusals,
      machine: s.machine,
      capabilities: s.capabilities,
      ramSectionId: s.ramSectionId,
      deviceStateBytes: s.deviceEnd - s.deviceStart,
      deviceSections: s.devices.length,
      blocks: s.ram.blocks.map((b) => b.name),
    };
  } catch (e) {
    if (e instanceof SnaploadError) return { servable: false, refusals: [e.message] };
    throw e;
  }
}

export function formatQemuRestorePlan(p: QemuRestorePlan): string[] {
  const lines = [`qemu-restore: ${p.servable ? "can restore this file" : "REFUSES this file"}`];
  if (p.machine !== undefined) {
    lines.push(
      `  machine:      ${p.machine} (the destination must run this machine type)`,
      `  capabilities: ${p.capabilities!.join(", ") || "none"} (dropped from the live stream)`,
      `  device state: ${p.deviceStateBytes} bytes in ${p.deviceSections} sections, sent verbatim after the RAM section header`,
      `  RAM blocks:   all ${p.blocks!.length} sent (requested pages first, the rest in the background)`,
    );
  }
  for (const r of p.refusals) lines.push(`  refused: ${r}`);
  return lines;
}
