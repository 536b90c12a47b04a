// A bounded pool of equal native buffers, carved from a few large mappings (slabs), so N users
// cost N/slab mappings and never more than `max` buffers: a flood of clients meets "full",
// not vm.max_map_count or an exception.
import { NativeBuffer } from "./ffi.ts";

export interface PooledBuffer {
  readonly address: number;
  readonly bytes: Uint8Array;
}

export class BufferPool {
  private readonly free: PooledBuffer[] = [];
  private readonly slabs: NativeBuffer[] = [];
  private made = 0;

  constructor(readonly size: number, readonly max: number, private readonly perSlab = 16) {}

  /** A buffer, or undefined when `max` are in use. */
  take(): PooledBuffer | undefined {
    const b = this.free.pop();
    if (b !== undefined) return b;
    if (this.made >= this.max) return undefined;
    const n = Math.min(this.perSlab, this.max - this.made);
    const slab = new NativeBuffer(n * this.size);
    this.slabs.push(slab);
    for (let i = n - 1; i >= 0; i--) {
      this.free.push({ address: slab.address + i * this.size, bytes: slab.bytes.subarray(i * this.size, (i + 1) * this.size) });
    }
    this.made += n;
    return this.free.pop();
  }

  give(b: PooledBuffer): void {
    this.free.push(b);
  }

  /** Unmaps everything; no buffer may be used after this. */
  close(): void {
    for (const s of this.slabs) s.free();
    this.slabs.length = 0;
    this.free.length = 0;
    this.made = 0;
  }
}
