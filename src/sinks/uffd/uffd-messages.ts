// Decoding a batch of struct uffd_msg read into memory shared with C: typed-array views, no
// BigInt, no allocation. Used by the fault path and by a detached VM's drain alike.
import { type NativeBuffer, sl, UFFD_EVENT_FORK, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE, UFFD_MSG_SIZE } from "../../core/ffi.ts";

export type RemoveSink = (start: number, end: number) => void;

/**
 * Decodes n messages in buf: calls onRemove for every REMOVE, closes the userfaultfd a FORK
 * message carries (reading it installed that fd in our process; it is not ours to keep), and
 * writes the page-fault addresses into faults, sorted ascending. Returns how many faults.
 * REMAP/UNMAP are never enabled by a Firecracker-style VMM: they are skipped.
 */
export function decodeMessages(buf: NativeBuffer, n: number, faults: Float64Array, onRemove: RemoveSink): number {
  const bytes = buf.bytes;
  const u32 = buf.u32;
  let nf = 0;
  for (let i = 0; i < n; i++) {
    const o = i * UFFD_MSG_SIZE;
    const w = o >> 2;
    const event = bytes[o];
    if (event === UFFD_EVENT_PAGEFAULT) faults[nf++] = u32[w + 4]! + u32[w + 5]! * 0x1_0000_0000;
    else if (event === UFFD_EVENT_REMOVE) onRemove(u32[w + 2]! + u32[w + 3]! * 0x1_0000_0000, u32[w + 4]! + u32[w + 5]! * 0x1_0000_0000);
    else if (event === UFFD_EVENT_FORK) sl.sl_close(u32[w + 2]!);
  }
  // Insertion sort: batches are small and often already in order, and it allocates nothing.
  for (let a = 1; a < nf; a++) {
    const x = faults[a]!;
    let b = a - 1;
    while (b >= 0 && faults[b]! > x) {
      faults[b + 1] = faults[b]!;
      b--;
    }
    faults[b + 1] = x;
  }
  return nf;
}

/** Writes a page-fault message as the kernel would, at slot i (the JIT warm-up and benchmarks). */
export function writeFaultMessage(buf: NativeBuffer, i: number, addr: number): void {
  const o = i * UFFD_MSG_SIZE;
  buf.bytes.fill(0, o, o + UFFD_MSG_SIZE);
  buf.bytes[o] = UFFD_EVENT_PAGEFAULT;
  buf.view.setUint32(o + 16, addr % 0x1_0000_0000, true);
  buf.view.setUint32(o + 20, Math.floor(addr / 0x1_0000_0000), true);
}
