// The kernel boundary of the fault path: the userfaultfd calls a VM's session makes once it is
// set up. The real one is the C core through FFI; tests pass a model of the kernel instead, so
// races (EAGAIN with coalesced faults, a fault racing the unregister, partial copies) are
// deterministic without patching the global symbol table. Every call returns 0 (or a count)
// or -errno, as the C core does.
import { sl } from "../../core/ffi.ts";

export interface UffdKernel {
  /** Reads up to `max` uffd_msg (32 bytes each) into `buf`: the count, 0 when none is queued, or -errno. */
  read(uffd: number, buf: number, max: number): number;
  /** UFFDIO_COPY of `len` bytes from `src` to `dst`; bytes done go to the u64 at `done` (also on error). */
  copy(uffd: number, dst: number, src: number, len: number, mode: number, done: number): number;
  /** UFFDIO_ZEROPAGE; bytes done go to the u64 at `done`. */
  zeropage(uffd: number, dst: number, len: number, mode: number, done: number): number;
  /** UFFDIO_WAKE: threads blocked on [start, start+len) retry their access. */
  wake(uffd: number, start: number, len: number): number;
  /** UFFDIO_UNREGISTER of [start, start+len). */
  unregister(uffd: number, start: number, len: number): number;
}

/**
 * The C core. The FFI functions themselves are the methods (no wrapper): a call through this
 * object costs what `sl.sl_uffd_copy(...)` costs.
 */
export const realKernel: UffdKernel = {
  read: sl.sl_uffd_read as unknown as UffdKernel["read"],
  copy: sl.sl_uffd_copy as unknown as UffdKernel["copy"],
  zeropage: sl.sl_uffd_zeropage as unknown as UffdKernel["zeropage"],
  wake: sl.sl_uffd_wake as unknown as UffdKernel["wake"],
  unregister: sl.sl_uffd_unregister as unknown as UffdKernel["unregister"],
};
