// Opens what `--mem` names: a local image file (raw or mapped-ram), or `tcp://HOST:PORT`,
// a remote page server (postcopy), or a snapshot store. `openRemoteFile` opens the same remote
// sources as a file read by range (qemu-restore: a snapshot served or pushed --whole-file).
import { ConfigError } from "../core/errors.ts";
import { imageBackend } from "./image/image-backend.ts";
import { openImage } from "./image/open-image.ts";
import type { OpenedSource, SourceOptions } from "./port.ts";
import type { RemoteFile } from "./remote-file.ts";
import { isStoreUrl } from "./store/stores.ts";

export type { OpenedSource, SourceOptions } from "./port.ts";

/** `--mem tcp://HOST:PORT`: our page server. */
export const isPageServer = (mem: string): boolean => mem.startsWith("tcp://");
/** Whether `--mem` names a remote source (page server or store) rather than a local file. */
export const isRemote = (mem: string): boolean => isPageServer(mem) || isStoreUrl(mem);

export async function openSource(mem: string, opts: SourceOptions): Promise<OpenedSource> {
  if (isPageServer(mem)) {
    const { openRemoteSource } = await import("../postcopy/remote-source.ts").catch(() => {
      throw new ConfigError(`--mem ${mem}: this build has no postcopy client`);
    });
    return openRemoteSource(mem, opts);
  }
  if (isStoreUrl(mem)) return (await import("./store/store-source.ts")).openStoreSource(mem, opts);
  const image = openImage(mem, { ramblock: opts.ramblock });
  const backend = imageBackend(image);
  return {
    source: { kind: "image", backend },
    summary: `${backend.description}, ${image.size} bytes (${image.dataPages} data, ${image.zeroPages} zero pages)`,
    fields: { format: image.format, block: image.blockName, dataPages: image.dataPages, zeroPages: image.zeroPages },
    close: () => image.close(),
  };
}

export async function openRemoteFile(mem: string, opts: SourceOptions): Promise<RemoteFile> {
  if (isPageServer(mem)) {
    const { openRangeClient } = await import("../postcopy/range-client.ts").catch(() => {
      throw new ConfigError(`--mem ${mem}: this build has no postcopy client`);
    });
    return openRangeClient(mem, opts);
  }
  if (isStoreUrl(mem)) return (await import("./store/store-file.ts")).openStoreFile(mem, opts);
  throw new ConfigError(`--mem ${mem}: not a remote source (tcp://HOST:PORT or a STORE/NAME)`);
}
