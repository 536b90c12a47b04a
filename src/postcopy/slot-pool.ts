// Slots: C memory a reply's payload is read into and installed from (UFFDIO_COPY reads it there).
// A few freed slots are kept for the next requests, so a steady stream allocates nothing.
import { NativeBuffer } from "../core/ffi.ts";

const FREE_SLOTS_KEPT = 32;

export class SlotPool {
  private readonly free: NativeBuffer[] = [];
  private closed = false;

  /** `size`: bytes per slot (one request's bytes at most). */
  constructor(readonly size: number) {}

  take(): NativeBuffer {
    return this.free.pop() ?? new NativeBuffer(this.size);
  }

  give(slot: NativeBuffer): void {
    if (this.free.length < FREE_SLOTS_KEPT && !this.closed) this.free.push(slot);
    else slot.free();
  }

  /** Frees the kept slots; slots given back later are freed at once. */
  close(): void {
    this.closed = true;
    for (const s of this.free.splice(0)) s.free();
  }
}
