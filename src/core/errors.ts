// Typed errors: every failure carries a stable `code` and the context needed for one clear log line.

export type ErrorCode =
  | "BAD_CONFIG"
  | "BAD_IMAGE"
  | "BAD_HANDSHAKE"
  | "REGION_OUT_OF_IMAGE"
  | "SYSCALL"
  | "PEER_GONE"
  | "BAD_FRAME"
  | "AUTH_FAILED"
  | "BAD_WORKING_SET"
  | "SOCKET_IN_USE"
  // the C core (libsnapload.so) cannot be loaded, or is not the version this code speaks
  | "BAD_LIBRARY"
  // a VMM faulted on memory it did not announce in its handshake
  | "UNANNOUNCED_MEMORY"
  // object stores (src/store/)
  | "STORE_UNAVAILABLE"
  | "NOT_FOUND"
  | "BAD_MANIFEST"
  | "BAD_CHUNK"
  // qemu-restore / qemu-save (src/qemu/)
  | "QMP"
  | "QEMU_MISMATCH"
  | "MIGRATION";

export class SnaploadError extends Error {
  readonly code: ErrorCode;
  readonly context: Record<string, unknown>;

  /** `options.cause`: the error this one explains (kept as the standard `cause`). */
  constructor(code: ErrorCode, message: string, context: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "SnaploadError";
    this.code = code;
    this.context = context;
  }
}

export class ImageError extends SnaploadError {
  constructor(message: string, context: Record<string, unknown> = {}) {
    super("BAD_IMAGE", message, context);
    this.name = "ImageError";
  }
}

export class HandshakeError extends SnaploadError {
  constructor(message: string, context: Record<string, unknown> = {}, code: ErrorCode = "BAD_HANDSHAKE") {
    super(code, message, context);
    this.name = "HandshakeError";
  }
}

export class SyscallError extends SnaploadError {
  readonly errno: number;
  constructor(call: string, errno: number, errnoName: string, context: Record<string, unknown> = {}) {
    // The path (when there is one) is what a person needs to act on the error.
    const where = typeof context.path === "string" ? `${context.path}: ` : "";
    super("SYSCALL", `${where}${call} failed: ${errnoName}`, { ...context, call, errno });
    this.name = "SyscallError";
    this.errno = errno;
  }
}

export class ConfigError extends SnaploadError {
  constructor(message: string, context: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super("BAD_CONFIG", message, context, options);
    this.name = "ConfigError";
  }
}

/** The socket path is taken: a live listener answers on it, or it is not a socket file. */
export class SocketInUseError extends SnaploadError {
  constructor(message: string, context: Record<string, unknown> = {}) {
    super("SOCKET_IN_USE", message, context);
    this.name = "SocketInUseError";
  }
}
