// Bindings to the C core (csrc/snapload.h). Every function returns >= 0 or -errno.
// Addresses travel as plain numbers: host addresses are < 2^47, so no BigInt on the hot path.
import { dlopen, FFIType, toArrayBuffer, type Pointer } from "bun:ffi";
import { existsSync } from "node:fs";
import { constants as osConstants } from "node:os";
import { join } from "node:path";
import { getSystemErrorName } from "node:util";
// Embedded into the single binary by `bun build --compile`; a plain path when run from source.
import embeddedLib from "../../build/libsnapload.so" with { type: "file" };
import { SnaploadError, SyscallError } from "./errors.ts";

const { i32, u32, u64, ptr, cstring } = FFIType;

/** The C core's functions as Bun sees them; test/abi.test.ts checks them against csrc/snapload.h. */
export const FFI_SYMBOLS = {
  sl_abi_version: { args: [], returns: i32 },
  sl_buffer_alloc: { args: [u64, ptr], returns: i32 },
  sl_buffer_free: { args: [ptr, u64], returns: i32 },
  sl_file_open_ro: { args: [cstring], returns: i32 },
  sl_file_stat: { args: [i32, ptr, ptr], returns: i32 },
  sl_file_seek_data: { args: [i32, u64, ptr], returns: i32 },
  sl_file_seek_hole: { args: [i32, u64, ptr], returns: i32 },
  sl_file_pread: { args: [i32, ptr, u32, u64], returns: i32 },
  sl_file_map: { args: [i32, u64, u64, i32, ptr], returns: i32 },
  sl_unmap: { args: [ptr, u64], returns: i32 },
  sl_madvise: { args: [ptr, u64, i32], returns: i32 },
  sl_mincore: { args: [ptr, u64, ptr], returns: i32 },
  sl_close: { args: [i32], returns: i32 },
  sl_set_nonblock: { args: [i32], returns: i32 },
  sl_uffd_open: { args: [i32], returns: i32 },
  sl_uffd_api: { args: [i32, u64, ptr, ptr], returns: i32 },
  sl_uffd_register: { args: [i32, u64, u64, u64, ptr], returns: i32 },
  sl_uffd_unregister: { args: [i32, u64, u64], returns: i32 },
  sl_fd_is_uffd: { args: [i32], returns: i32 },
  sl_uffd_read: { args: [i32, ptr, i32], returns: i32 },
  sl_uffd_copy: { args: [i32, u64, ptr, u64, i32, ptr], returns: i32 },
  sl_uffd_zeropage: { args: [i32, u64, u64, i32, ptr], returns: i32 },
  sl_uffd_wake: { args: [i32, u64, u64], returns: i32 },
  sl_epoll_create: { args: [], returns: i32 },
  sl_epoll_ctl: { args: [i32, i32, i32, u32, u64], returns: i32 },
  sl_epoll_wait: { args: [i32, ptr, i32, i32], returns: i32 },
  sl_epoll_spin: { args: [i32, ptr, i32, u32], returns: i32 },
  sl_toucher_start: { args: [ptr, u64, u32, u32, i32, i32, ptr], returns: i32 },
  sl_toucher_join: { args: [u64], returns: i32 },
  sl_eventfd: { args: [], returns: i32 },
  sl_eventfd_signal: { args: [i32], returns: i32 },
  sl_eventfd_drain: { args: [i32], returns: i32 },
  sl_unix_listen: { args: [cstring, u32, i32, ptr], returns: i32 },
  sl_unix_unlink_if: { args: [cstring, u64, u64], returns: i32 },
  sl_accept: { args: [i32], returns: i32 },
  sl_recv_fds: { args: [i32, ptr, u32, ptr, i32, ptr, ptr], returns: i32 },
  sl_peer_cred: { args: [i32, ptr], returns: i32 },
  sl_tcp_listen: { args: [cstring, i32, i32], returns: i32 },
  sl_local_port: { args: [i32], returns: i32 },
  sl_tcp_connect: { args: [cstring, i32], returns: i32 },
  sl_socket_error: { args: [i32], returns: i32 },
  sl_recv: { args: [i32, ptr, u32], returns: i32 },
  sl_send: { args: [i32, ptr, u32], returns: i32 },
  sl_kill: { args: [i32, i32], returns: i32 },
  sl_pidfd_open: { args: [i32], returns: i32 },
  sl_peer_pidfd: { args: [i32], returns: i32 },
  sl_pidfd_send_signal: { args: [i32, i32], returns: i32 },
} as const;

function libraryPath(): string {
  const override = process.env.SNAPLOAD_LIB;
  if (override) return override;
  if (existsSync(embeddedLib)) return embeddedLib;
  return join(import.meta.dir, "..", "..", "build", "libsnapload.so");
}

export const ABI_VERSION = 3;
const library = libraryPath();
const loaded = load(library);
export const sl = loaded.symbols;
if (sl.sl_abi_version() !== ABI_VERSION) {
  throw new SnaploadError("BAD_LIBRARY", `${library}: C core ABI ${sl.sl_abi_version()}, this snapload needs ${ABI_VERSION} (rebuild it: bun scripts/build-c.ts)`, {
    path: library, abi: sl.sl_abi_version(), expected: ABI_VERSION,
  });
}

function load(path: string) {
  try {
    return dlopen(path, FFI_SYMBOLS);
  } catch (e) {
    throw new SnaploadError("BAD_LIBRARY", `cannot load the C core ${path}: ${(e as Error).message}`, { path }, { cause: e });
  }
}

/** A NUL-terminated string for `cstring` arguments. */
export function cstr(s: string): Buffer {
  return Buffer.from(`${s}\0`, "utf8");
}

/** Memory owned by us, allocated by C (stable address), viewed from JS without copies. */
export class NativeBuffer {
  /** Typed as a Pointer for the FFI; it is a plain number at run time (arithmetic needs `as Pointer`). */
  readonly address: Pointer;
  readonly bytes: Uint8Array;
  readonly u32: Uint32Array;
  readonly view: DataView;
  #freed = false;

  constructor(readonly length: number) {
    const out = new BigUint64Array(1);
    const r = sl.sl_buffer_alloc(length, out);
    if (r < 0) throw new SyscallError(`allocating ${length} bytes`, -r, errnoName(-r), { length });
    this.address = Number(out[0]) as Pointer;
    const ab = toArrayBuffer(this.address as Pointer, 0, length);
    this.bytes = new Uint8Array(ab);
    this.u32 = new Uint32Array(ab);
    this.view = new DataView(ab);
  }

  /** Reads a u64 that is known to fit in 2^53 (addresses, sizes). */
  u64(offset: number): number {
    return this.view.getUint32(offset, true) + this.view.getUint32(offset + 4, true) * 0x1_0000_0000;
  }

  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    sl.sl_buffer_free(this.address, this.length);
  }
}

// Errno names and numbers come from the runtime, not a table of our own.
const ERRNO = osConstants.errno;
const ERRNO_BY_NUMBER = new Map<number, string>();
for (const [name, n] of Object.entries(ERRNO)) if (!ERRNO_BY_NUMBER.has(n)) ERRNO_BY_NUMBER.set(n, name);

/**
 * The symbolic name of a positive errno: the name Bun/Node put in `error.code` for it (so ours
 * read like theirs: ENOTSUP for 95), else the first os.constants.errno name with that number
 * (Bun's libuv table lacks a few, such as EINPROGRESS).
 */
export function errnoName(errno: number): string {
  if (errno > 0) {
    const name = getSystemErrorName(-errno);
    if (!name.startsWith("Unknown")) return name;
  }
  return ERRNO_BY_NUMBER.get(errno) ?? `errno ${errno}`;
}

export const Errno = {
  EPERM: ERRNO.EPERM, ENOENT: ERRNO.ENOENT, ESRCH: ERRNO.ESRCH, EINTR: ERRNO.EINTR, EAGAIN: ERRNO.EAGAIN,
  EEXIST: ERRNO.EEXIST, EINVAL: ERRNO.EINVAL, ENXIO: ERRNO.ENXIO, ENOMEM: ERRNO.ENOMEM,
  EINPROGRESS: ERRNO.EINPROGRESS, ECONNREFUSED: ERRNO.ECONNREFUSED, EOPNOTSUPP: ERRNO.EOPNOTSUPP,
  EADDRINUSE: ERRNO.EADDRINUSE,
} as const;

export const EPOLLIN = 0x001;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
export const EPOLLRDHUP = 0x2000;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
/** csrc/snapload.h's limits and modes (checked against the header by test/abi.test.ts). */
export const SL_EPOLL_MAX_EVENTS = 256;
export const SL_MAX_FDS = 16;
export const SL_UFFD_MODE_MISSING = 1;

export const UFFD_EVENT_PAGEFAULT = 0x12;
export const UFFD_EVENT_FORK = 0x13;
export const UFFD_EVENT_REMAP = 0x14;
export const UFFD_EVENT_REMOVE = 0x15;
export const UFFD_EVENT_UNMAP = 0x16;
export const UFFD_MSG_SIZE = 32;
export const SL_EVENT_SIZE = 16;
export const COPY_DONTWAKE = 1;
