// A model of the kernel side of one VM's userfaultfd, for tests of the fault path and its owner
// (a UffdKernel passed where the daemon passes the C core): which pages exist, which vCPUs sleep
// on which page, what is queued on the uffd, and the answers the ioctls give — including the
// races real processes hit only by chance (EAGAIN while an event is pending, copies cut short,
// a range unregistered under a fault).
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { Errno, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE, UFFD_MSG_SIZE } from "../src/core/ffi.ts";
import type { UffdKernel } from "../src/sinks/uffd/kernel.ts";

/** Page size and guest address of page 0 of the modelled region. */
export const FAKE_PAGE = 4096;
export const FAKE_BASE = 0x7f00_0000_0000;
const PS = FAKE_PAGE;
const BASE = FAKE_BASE;
const COPY_DONTWAKE = 1;

type Msg = { kind: "fault"; page: number } | { kind: "remove"; first: number; count: number };

/**
 * A model of one registered region as the kernel sees it: which pages exist, which vCPUs sleep on
 * which page, what is queued on the uffd, and the answers the ioctls give.
 */
export class FakeKernel implements UffdKernel {
  present = new Set<number>();
  sleeping = new Set<number>();
  queue: Msg[] = [];
  registered = true;
  /** While > 0, every install ioctl fails with EAGAIN (a non-cooperative event is pending). */
  eagain = 0;
  /** The next install does only this many pages, then reports EAGAIN with progress (a partial copy). */
  partialNext: number | undefined;
  /** The next install fails with this errno. */
  failNext: number | undefined;
  /** Called after every install ioctl (to inject an event between two of them). */
  afterInstall: (() => void) | undefined;
  reads = 0;
  readHook: ((buf: number, max: number) => number) | undefined;
  readonly calls: string[] = [];

  /** A vCPU touches page p: it sleeps until the page exists and it is woken; the kernel queues a fault. */
  touch(p: number): void {
    if (this.present.has(p)) return;
    this.sleeping.add(p);
    this.queue.push({ kind: "fault", page: p });
  }

  /** The VMM discards pages (MADV_DONTNEED): they are gone now; the REMOVE event waits to be read. */
  discard(first: number, count: number): void {
    for (let p = first; p < first + count; p++) this.present.delete(p);
    this.queue.push({ kind: "remove", first, count });
  }

  read(_uffd: number, buf: number, max: number): number {
    this.reads++;
    if (this.readHook) return this.readHook(buf, max);
    const n = Math.min(max, this.queue.length);
    const bytes = new Uint8Array(toArrayBuffer(buf as Pointer, 0, max * UFFD_MSG_SIZE));
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const u64 = (o: number, v: number) => {
      view.setUint32(o, v % 0x1_0000_0000, true);
      view.setUint32(o + 4, Math.floor(v / 0x1_0000_0000), true);
    };
    for (const [i, m] of this.queue.splice(0, n).entries()) {
      const o = i * UFFD_MSG_SIZE;
      bytes.fill(0, o, o + UFFD_MSG_SIZE);
      if (m.kind === "fault") {
        writeFaultMessageAt(bytes, o, BASE + m.page * PS);
      } else {
        bytes[o] = UFFD_EVENT_REMOVE;
        u64(o + 8, BASE + m.first * PS);
        u64(o + 16, BASE + (m.first + m.count) * PS);
      }
    }
    return n;
  }

  copy(_uffd: number, dst: number, _src: number, len: number, mode: number, done: number): number {
    return this.install("copy", dst, len, mode, done);
  }

  zeropage(_uffd: number, dst: number, len: number, mode: number, done: number): number {
    return this.install("zeropage", dst, len, mode, done);
  }

  wake(_uffd: number, start: number, len: number): number {
    this.calls.push(`wake ${(start - BASE) / PS}+${len / PS}`);
    for (let p = (start - BASE) / PS; p < (start - BASE + len) / PS; p++) if (this.present.has(p) || !this.registered) this.sleeping.delete(p);
    return 0;
  }

  unregister(): number {
    this.calls.push("unregister");
    this.registered = false;
    return 0;
  }

  private install(what: string, dst: number, len: number, mode: number, done: number): number {
    const r = this.installNow(dst, len, mode, done);
    this.calls.push(`${what} ${(dst - BASE) / PS}+${len / PS} -> ${r}`);
    this.afterInstall?.();
    return r;
  }

  private installNow(dst: number, len: number, mode: number, done: number): number {
    const out = new DataView(toArrayBuffer(done as Pointer, 0, 8));
    out.setUint32(0, 0, true);
    out.setUint32(4, 0, true);
    if (!this.registered) return -Errno.ENOENT;
    if (this.failNext !== undefined) {
      const e = this.failNext;
      this.failNext = undefined;
      return -e;
    }
    if (this.eagain > 0) return -Errno.EAGAIN;
    const first = (dst - BASE) / PS;
    let n = len / PS;
    let cut = false;
    if (this.partialNext !== undefined && this.partialNext < n) {
      n = this.partialNext;
      cut = true;
    }
    this.partialNext = undefined;
    let k = 0;
    while (k < n && !this.present.has(first + k)) this.present.add(first + k++);
    if (!(mode & COPY_DONTWAKE)) for (let p = first; p < first + k; p++) this.sleeping.delete(p);
    if (k === len / PS) return 0;
    if (k === 0) return cut ? -Errno.EAGAIN : -Errno.EEXIST;
    out.setUint32(0, k * PS, true);
    return -Errno.EAGAIN; // progress, then stopped: the caller goes on from where it stopped
  }
}

function writeFaultMessageAt(bytes: Uint8Array, o: number, addr: number): void {
  bytes[o] = UFFD_EVENT_PAGEFAULT;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  view.setUint32(o + 16, addr % 0x1_0000_0000, true);
  view.setUint32(o + 20, Math.floor(addr / 0x1_0000_0000), true);
}
