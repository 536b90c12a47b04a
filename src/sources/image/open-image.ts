// Opens a memory image, telling QEMU mapped-ram files (they start with "QEVM") from raw files.
import { ConfigError } from "../../core/errors.ts";
import { sl } from "../../core/ffi.ts";
import { openMappedRamImage, QEVM_MAGIC } from "./mapped-ram.ts";
import { openRawImage } from "./raw-image.ts";
import { openRegularFile, preadAt, type ImageFormat, type SnapshotImage } from "./snapshot-image.ts";

export interface OpenImageOptions {
  /** mapped-ram only: the RAMBlock to serve (default: the largest). */
  ramblock?: string;
  /** Every byte of the file as it is, whatever its format (a mapped-ram file for qemu-restore). */
  wholeFile?: boolean;
  /**
   * Fill the mapping's page tables for what is cached (default true: faults served from it
   * never take a fault on our side). A push reads through pread and maps only to upload: false.
   */
  prefault?: boolean;
}

export function detectFormat(path: string): ImageFormat {
  const { fd } = openRegularFile(path);
  try {
    const head = new Uint8Array(4);
    const n = preadAt(fd, head, 4, 0, path);
    return n === 4 && String.fromCharCode(...head) === QEVM_MAGIC ? "mapped-ram" : "raw";
  } finally {
    sl.sl_close(fd);
  }
}

export function openImage(path: string, opts: OpenImageOptions = {}): SnapshotImage {
  if (opts.wholeFile) {
    if (opts.ramblock !== undefined) throw new ConfigError("--ramblock and --whole-file exclude each other", { path, ramblock: opts.ramblock });
    return openRawImage(path, opts.prefault);
  }
  const format = detectFormat(path);
  if (format === "mapped-ram") return openMappedRamImage(path, opts.ramblock, opts.prefault);
  if (opts.ramblock !== undefined) {
    throw new ConfigError(`--ramblock "${opts.ramblock}" applies only to QEMU mapped-ram files; ${path} is a raw image`, {
      path,
      ramblock: opts.ramblock,
    });
  }
  return openRawImage(path, opts.prefault);
}
