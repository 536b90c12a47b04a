// Opens what `--mem` names: a local image file (raw or mapped-ram), or `tcp://HOST:PORT`,
// a remote page server (postcopy), or a snapshot store. `openRemoteFile` opens the same remote
// sources as a file read by range (qemu-restore: a snapshot served or pushed --whole-file).
import { ConfigError } from "../core/errors.ts";
import { imageBackend } from "./image/image-backend.ts";
import { openImage } from "./image/open-image.ts";
import type { OpenedSource, SourceOptions } from "./port.ts";
import type { RemoteFile } from "./remote-file.ts";

export type { OpenedSource, SourceOptions } from "./port.ts";

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
    source: { kind: "image", backend },
    summary: `${backend.description}, ${image.size} bytes (${image.dataPages} data, ${image.zeroPages} zero pages)`,
    fields: { format: image.format, block: image.blockName, dataPages: image.dataPages, zeroPages: image.zeroPages },
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
