// Library surface of snapload: re-exports only.
export { SnaploadError, ImageError, HandshakeError, SyscallError, ConfigError } from "./core/errors.ts";
export { parseHandshake, scanJson, checkRegionsFitImage, type RegionMapping } from "./sinks/uffd/handshake.ts";
export { HandlerTable, Region } from "./scheduler/handler-table.ts";
export type { ImageBackend, PageBackend, PageRequester, PageSource, RemoteBackend, RequesterContext, RequesterVm } from "./sources/port.ts";
export { EventLoop } from "./core/event-loop.ts";
export { Server, type Listener, type ServerOptions, type VmExit } from "./daemon/server.ts";
export { VmSupervisor, type VmEnd } from "./daemon/vm-supervisor.ts";
export { VmSession, type VmFailure, type VmStats } from "./daemon/vm-session.ts";
export { Populator, type PopulateMode } from "./scheduler/populator.ts";
export { openImage } from "./sources/image/open-image.ts";
export { ZeroMap, type SnapshotImage } from "./sources/image/snapshot-image.ts";
export { imageBackend } from "./sources/image/image-backend.ts";
export { openSource } from "./sources/open-source.ts";
export { encodeWorkingSet, decodeWorkingSet, readWorkingSet, writeWorkingSet, TouchRecorder } from "./scheduler/working-set.ts";
export { Logger } from "./core/log.ts";
export { push, pull, inspectStore, fetchManifest } from "./sources/store/push.ts";
