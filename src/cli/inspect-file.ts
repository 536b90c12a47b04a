// `snapload inspect`: what an image holds and what `serve` would use from it.
import { defaultBlock } from "../sources/image/mapped-ram.ts";
import { openImage } from "../sources/image/open-image.ts";
import { IMAGE_PAGE, type MappedRamBlockInfo } from "../sources/image/snapshot-image.ts";
import { formatQemuRestorePlan, qemuRestorePlan, type QemuRestorePlan } from "../sinks/qemu/inspect-qemu.ts";

export interface InspectOptions {
  ramblock?: string;
  json?: boolean;
}

export interface InspectReport {
  path: string;
  format: "raw" | "mapped-ram";
  size: number;
  pageSize: number; // of the served block (raw: 4096)
  dataPages: number; // 4 KiB pages
  zeroPages: number; // 4 KiB pages
  dataBytes: number;
  zeroBytes: number;
  block?: string; // mapped-ram: the block described above
  defaultBlock?: string; // mapped-ram: what `serve` picks without --ramblock
  blocks?: MappedRamBlockInfo[];
  qemuRestore?: QemuRestorePlan; // mapped-ram: what `qemu-restore` does with the whole file
}

export function inspectReport(path: string, opts: InspectOptions = {}): InspectReport {
  const image = opts.ramblock === undefined ? openImage(path) : openImage(path, { ramblock: opts.ramblock });
  try {
    const chosen = image.blocks?.find((b) => b.name === image.blockName);
    // The last page may be partial (raw files): count bytes, not whole pages.
    const pad = image.zero.pages * IMAGE_PAGE - image.size;
    const lastZero = image.zero.pages > 0 && image.zero.isZero(image.zero.pages - 1);
    const zeroBytes = image.zeroPages * IMAGE_PAGE - (lastZero ? pad : 0);
    const report: InspectReport = {
      path: image.path,
      format: image.format,
      size: image.size,
      pageSize: chosen?.pageSize ?? IMAGE_PAGE,
      dataPages: image.dataPages,
      zeroPages: image.zeroPages,
      dataBytes: image.size - zeroBytes,
      zeroBytes,
    };
    if (image.blocks && image.blockName !== undefined) {
      report.block = image.blockName;
      report.defaultBlock = defaultBlock(image.blocks).name;
      report.blocks = image.blocks;
      report.qemuRestore = qemuRestorePlan(image.path);
    }
    return report;
  } finally {
    image.close();
  }
}

export function inspectImage(path: string, opts: InspectOptions = {}): string {
  const r = inspectReport(path, opts);
  if (opts.json) return JSON.stringify(r, null, 2);
  const lines = [
    `image:      ${r.path}`,
    `format:     ${r.format}`,
  ];
  if (r.block !== undefined) {
    const why = r.block === r.defaultBlock ? "default: the largest block" : `chosen; default would be ${r.defaultBlock}`;
    lines.push(`block:      ${r.block} (${why})`);
  }
  lines.push(
    `size:       ${r.size} bytes (${mib(r.size)})`,
    `page size:  ${r.pageSize} (zero map in ${IMAGE_PAGE}-byte pages)`,
    `data pages: ${r.dataPages} (${mib(r.dataBytes)})`,
    `zero pages: ${r.zeroPages} (${mib(r.zeroBytes)})`,
  );
  if (r.blocks) {
    lines.push(`blocks:     ${r.blocks.length} (* = served; data/zero counted in each block's page size)`);
    const rows = r.blocks.map((b) => [
      b.name === r.block ? "*" : " ",
      b.name,
      String(b.usedLength),
      (b.usedLength / (1024 * 1024)).toFixed(1),
      String(b.pageSize),
      String(b.dataPages),
      String(b.zeroPages),
      `0x${b.bitmapOffset.toString(16)}`,
      `0x${b.pagesOffset.toString(16)}`,
    ]);
    const header = ["", "name", "used length", "MiB", "page", "data", "zero", "bitmap@", "pages@"];
    lines.push(...table([header, ...rows]).map((l) => `  ${l}`));
  }
  if (r.qemuRestore) lines.push(...formatQemuRestorePlan(r.qemuRestore));
  return lines.join("\n");
}

function mib(bytes: number): string {
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => (c === 1 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join("  ").trimEnd());
}
