// Library surface of snapload: re-exports only.
export { SnaploadError, ImageError, HandshakeError, SyscallError, ConfigError } from "./errors.ts";
export { parseHandshake, scanJson, checkRegionsFitImage, type RegionMapping } from "./handshake.ts";
export { HandlerTable, Region, type PageBackend, type PageRequester } from "./handler-table.ts";
export { EventLoop } from "./event-loop.ts";
export { Server, type Listener, type PageSource, type ServerOptions, type VmExit } from "./server.ts";
export { VmSession, type VmStats } from "./vm-session.ts";
export { Populator, type PopulateMode } from "./populator.ts";
export { openImage } from "./image/open-image.ts";
export { ZeroMap, type SnapshotImage } from "./image/snapshot-image.ts";
export { imageBackend } from "./image-backend.ts";
export { openSource } from "./page-source.ts";
export { encodeWorkingSet, decodeWorkingSet, readWorkingSet, writeWorkingSet, TouchRecorder } from "./working-set.ts";
export { Logger } from "./log.ts";
export { push, pull, inspectStore, fetchManifest } from "./store/push.ts";
