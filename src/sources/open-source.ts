// Opens what `--mem` names: a local image file (raw or mapped-ram), or `tcp://HOST:PORT`,
// a remote page server (postcopy).
import { ConfigError } from "../core/errors.ts";
import { imageBackend } from "./image/image-backend.ts";
import { openImage } from "./image/open-image.ts";
import type { OpenedSource, SourceOptions } from "./port.ts";

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
