// JIT warm-up: before the first VM connects, run the real fault path a few thousand times
// against memory of our own, so the first restore is served by optimised code rather than by
// the interpreter. Plain C needs no warm-up; a daemon that restores thousands of VMs reaches
// this state after its first VM anyway — this only spares that first VM.
import { check } from "./check.ts";
import { NativeBuffer, sl } from "./ffi.ts";
import { HandlerTable, type PageBackend } from "./handler-table.ts";
import { IMAGE_PAGE, ZeroMap } from "./image/snapshot-image.ts";
import { Scratch, VmSession } from "./vm-session.ts";
import { writeFaultMessage } from "./uffd-messages.ts";

const PAGES = 64;
const MADV_DONTNEED = 4;
const UFFD_FLAGS = 0o2000000 | 0o4000; // O_CLOEXEC | O_NONBLOCK

/** Runs `rounds` passes over PAGES pages (half data, half zero). Returns false if userfaultfd is unavailable. */
export function warmUpFaultPath(rounds = 150): boolean {
  const uffd = sl.sl_uffd_open(UFFD_FLAGS);
  if (uffd < 0) return false;
  const len = PAGES * IMAGE_PAGE;
  const guest = new NativeBuffer(len);
  const source = new NativeBuffer(len);
  const scratch = new Scratch();
  try {
    check("UFFDIO_API", sl.sl_uffd_api(uffd, 0, null, null));
    check("UFFDIO_REGISTER", sl.sl_uffd_register(uffd, guest.address, len, 1, null));
    source.bytes.fill(0x5a);
    const zero = new ZeroMap(PAGES);
    zero.setZeroRange(PAGES / 2, PAGES / 2);
    // Same shape as imageBackend() builds, so the optimised code fits the real backends.
    const backend: PageBackend = { kind: "image", size: len, zero, base: source.address, zeroBytesAreZero: true, description: "warm-up" };
    const table = new HandlerTable([{ base: guest.address, size: len, offset: 0, pageSize: IMAGE_PAGE }], backend);
    const vm = new VmSession(0, 0, uffd, -1, table, scratch, { faultAround: 1 });
    const msgs = scratch.msgs;
    for (let round = 0; round < rounds; round++) {
      // Batches of 1..4 faults, as a loaded daemon sees them; every page faults once per round.
      for (let p = 0; p < PAGES; ) {
        const n = Math.min(1 + (p % 4), PAGES - p);
        for (let k = 0; k < n; k++) writeFaultMessage(msgs, k, guest.address + (p + k) * IMAGE_PAGE);
        vm.dispatch(msgs, n);
        p += n;
      }
      // Drop the pages (no REMOVE event: we did not ask for them) so the next round faults again.
      sl.sl_madvise(guest.address, len, MADV_DONTNEED);
      for (const r of table.regions) {
        r.state.fill(0);
        r.settled = 0;
      }
    }
    return vm.fatal === undefined;
  } finally {
    sl.sl_close(uffd);
    guest.free();
    source.free();
    scratch.free();
  }
}
