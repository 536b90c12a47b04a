// Library surface of snapload: the parts its commands are built from, for a program (or a test
// fixture) that runs them in-process. Re-exports only; everything else is internal to its module.
// test/library.test.ts checks that each name here is used by the CLI (src/cli/) or the tests.
export { ConfigError, HandshakeError, ImageError, SnaploadError, SyscallError } from "./core/errors.ts";
export { type EventName, Logger, type LogRecord } from "./core/log.ts";
export { openImage } from "./sources/image/open-image.ts";
export { type SnapshotImage, ZeroMap } from "./sources/image/snapshot-image.ts";
export { imageBackend } from "./sources/image/image-backend.ts";
export { openSource } from "./sources/open-source.ts";
export { inspectStore, pull, push } from "./sources/store/push.ts";
export { parseHandshake } from "./sinks/uffd/handshake.ts";
export { decodeWorkingSet, encodeWorkingSet, readWorkingSet, writeWorkingSet } from "./scheduler/working-set.ts";
export { Server, type VmExit } from "./daemon/server.ts";
export { PageServer, type PageServerFaults } from "./postcopy/page-server.ts";
