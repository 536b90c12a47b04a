// Socket calls the page server makes beside the C core's (libc through bun:ffi): the peer
// address of an accepted TCP socket, to count unauthenticated connections per source address
// (IPv4-mapped IPv6 addresses count as IPv4), and TCP_DEFER_ACCEPT on the listener.
import { dlopen, FFIType } from "bun:ffi";

const libc = dlopen("libc.so.6", {
  getpeername: { args: [FFIType.i32, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  setsockopt: { args: [FFIType.i32, FFIType.i32, FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
}).symbols;

const IPPROTO_TCP = 6;
const TCP_DEFER_ACCEPT = 9;

/**
 * The kernel hands us a connection only once its first bytes arrived (or `seconds` passed): a
 * client that connects and says nothing waits in the kernel, not in our fd table, and a
 * legitimate client (HELLO right after connect) is not queued behind it. False if refused.
 */
export function deferAccept(listenFd: number, seconds: number): boolean {
  return libc.setsockopt(listenFd, IPPROTO_TCP, TCP_DEFER_ACCEPT, new Int32Array([seconds]), 4) === 0;
}

const AF_INET = 2;
const AF_INET6 = 10;
const SOCKADDR_STORAGE = 128;

const addr = new Uint8Array(SOCKADDR_STORAGE);
const view = new DataView(addr.buffer);
const len = new Uint32Array(1);

/** "10.0.0.7", "2001:db8::1", or "unknown" (not a TCP socket, or already reset). */
export function peerAddress(fd: number): string {
  len[0] = SOCKADDR_STORAGE;
  if (libc.getpeername(fd, addr, len) !== 0) return "unknown";
  const family = view.getUint16(0, true);
  if (family === AF_INET) return addr.subarray(4, 8).join(".");
  if (family !== AF_INET6) return "unknown";
  const a = addr.subarray(8, 24);
  if (a.subarray(0, 10).every((b) => b === 0) && a[10] === 0xff && a[11] === 0xff) return a.subarray(12, 16).join(".");
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((a[i]! << 8) | a[i + 1]!).toString(16));
  return groups.join(":");
}
