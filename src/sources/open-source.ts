// Opens what `--mem` names: a local image file (raw or mapped-ram), or `tcp://HOST:PORT`,
// a remote page server (postcopy), or a snapshot store. `openRemoteFile` opens the same remote
// sources as a file read by range (qemu-restore: a snapshot served or pushed --whole-file).
import { ConfigError } from "../core/errors.ts";
import { imageBackend } from "./image/image-backend.ts";
import { openImage } from "./image/open-image.ts";
import type { EventLoop } from "../core/event-loop.ts";
import type { Logger } from "../core/log.ts";
import type { PageSource } from "../daemon/server.ts";
import type { RemoteFile } from "./remote-file.ts";

export interface OpenedSource {
  source: PageSource;
  /** One line for the log: what is served, how big, data vs zero. */
  summary: string;
  close(): void;
  /** A working set the source carries (a store manifest's), prefetched unless --prefetch says otherwise. */
  prefetch?: Uint32Array;
  /** Called once the daemon's event loop exists, before it runs (sources with background upkeep). */
  attach?(loop: EventLoop): void;
}

export interface SourceOptions {
  ramblock?: string;
  tokenFile?: string;
  /** How long VMs may wait for an unreachable page server before they are killed. */
  deadlineMs: number;
  /** As given on the command line; undefined = the source's default (tcp:// pulls everything). */
  populate?: "none" | "background";
  logger: Logger;
  /** Object stores (src/store/): host chunk cache, its size in bytes, S3 endpoint, GETs in flight. */
  cacheDir?: string;
  cacheSize?: number;
  s3Endpoint?: string;
  storeParallel?: number;
}

export async function openSource(mem: string, opts: SourceOptions): Promise<OpenedSource> {
  if (mem.startsWith("tcp://")) {
    const { openRemoteSource } = await import("../postcopy/remote-source.ts").catch(() => {
      throw new ConfigError(`--mem ${mem}: this build has no postcopy client`);
    });
    return openRemoteSource(mem, opts);
  }
  if (/^(file|s3|https?):\/\//.test(mem)) return (await import("./store/store-source.ts")).openStoreSource(mem, opts);
  const image = openImage(mem, { ramblock: opts.ramblock });
  const backend = imageBackend(image);
  return {
    source: { backend },
    summary: `${backend.description}, ${image.size} bytes (${image.dataPages} data, ${image.zeroPages} zero pages)`,
    close: () => image.close(),
  };
}

/** Whether `--mem` names a remote source (page server or store) rather than a local file. */
export function isRemote(mem: string): boolean {
  return /^(tcp|file|s3|https?):\/\//.test(mem);
}

export async function openRemoteFile(mem: string, opts: SourceOptions): Promise<RemoteFile> {
  if (mem.startsWith("tcp://")) {
    const { openRangeClient } = await import("../postcopy/range-client.ts").catch(() => {
      throw new ConfigError(`--mem ${mem}: this build has no postcopy client`);
    });
    return openRangeClient(mem, opts);
  }
  if (/^(file|s3|https?):\/\//.test(mem)) return (await import("./store/store-file.ts")).openStoreFile(mem, opts);
  throw new ConfigError(`--mem ${mem}: not a remote source (tcp://HOST:PORT or a STORE/NAME)`);
}
