// The port for a snapshot FILE read by range from a remote source (a page server serving the
// file whole, or an object store holding it pushed whole): what `qemu-restore` needs, which
// reads the file's own structure (device state, block records) and not only pages.

import type { Fields } from "../core/log.ts";

export interface RemoteFile {
  readonly size: number;
  /** Names the snapshot in messages (the --mem value). */
  readonly description: string;
  /**
   * Bytes [off, off+len), 4 KiB aligned (the last page may run past `size`: it reads as zero),
   * present and verified (authenticated frames, hash-checked chunks). `urgent`: a guest waits.
   * Rejects only when the source gave up (its deadline passed, or it refused).
   */
  read(off: number, len: number, urgent: boolean): Promise<Uint8Array>;
  /** For the log when the restore ends: what crossed the network, a line and its counters (qemu.source's fields). */
  report?(): { text: string; fields: Fields };
  close(): void;
}
