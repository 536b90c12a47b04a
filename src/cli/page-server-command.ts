// `snapload page-server`: opens the image, listens, serves until SIGINT/SIGTERM.
import { createHash } from "node:crypto";
import { statSync } from "node:fs";
import type { PageServerConfig } from "./page-server.ts";
import { openImage } from "../sources/image/open-image.ts";
import { openServedStore } from "../sources/store/served-store.ts";
import { isStoreUrl } from "../sources/store/stores.ts";
import type { SnapshotImage } from "../sources/image/snapshot-image.ts";
import type { EventLoop } from "../core/event-loop.ts";
import { type Fields, formatBytes, Logger } from "../core/log.ts";
import { type MetricsEndpoint, startMetricsEndpoint } from "../metrics/endpoint.ts";
import { renderPageServerMetrics } from "../metrics/page-server-metrics.ts";
import { PageServer, type PageServerFaults, type ServedImage } from "../postcopy/page-server.ts";
import { formatHostPort, parseHostPort, resolveHost } from "../postcopy/address.ts";
import { readTokenFile } from "../postcopy/auth.ts";
import { zeroMapBytes } from "../postcopy/protocol.ts";
import { logPostcopyWarmUp, warmUpPostcopy } from "../daemon/postcopy-warmup.ts";

export function pageServerCommand(config: PageServerConfig): Promise<number> {
  return runPageServer(config);
}

/** What one page server serves: a local image, or a store's verified chunks. */
interface Served {
  image: ServedImage;
  imageId: Uint8Array;
  wholeFile?: boolean;
  /** For page_server.listening: what is served, and its facts. */
  summary: string;
  fields: Fields;
  /** Joins the page server's loop (sources with background upkeep). */
  attach?(loop: EventLoop): void;
  close(): void;
}

/** The page server of `config`, until SIGINT/SIGTERM; `faults` is for tests (see PageServerFaults). */
export async function runPageServer(config: PageServerConfig, faults?: PageServerFaults): Promise<number> {
  const logger = new Logger(config["log-level"], { format: config["log-format"] });
  const token = readTokenFile(config["token-file"], logger);
  const where = await resolveHost(parseHostPort(config.listen, "--listen", true), "--listen");
  const served = isStoreUrl(config.mem) ? await openStore(config, logger) : openLocal(config);
  let metrics: MetricsEndpoint | undefined;
  try {
    const server = new PageServer({
      host: where.host,
      port: where.port,
      image: served.image,
      imageId: served.imageId,
      wholeFile: served.wholeFile,
      token,
      logger,
      handshakeTimeoutMs: config["handshake-timeout"],
      maxPreauth: config["max-preauth"],
      maxPreauthPerAddress: config["max-preauth-per-address"],
      maxClients: config["max-clients"],
      faults,
    });
    // Before it listens: the first client's pages are sent by optimised code (postcopy-warmup.ts).
    logPostcopyWarmUp(logger, "page_server.warm_up", await warmUpPostcopy(server.loop));
    served.attach?.(server.loop);
    if (config.metrics !== undefined) metrics = await startMetricsEndpoint(config.metrics, () => renderPageServerMetrics(server), logger);
    const port = server.listen();
    const address = formatHostPort({ host: where.host, port });
    const zeroPages = served.image.zero.countZero();
    const dataPages = served.image.zero.pages - zeroPages;
    logger.info(
      "page_server.listening",
      `page server listening on ${address}: ${served.summary}, ${formatBytes(served.image.size)} (${dataPages} data, ${zeroPages} zero pages); channel authenticated and encrypted (AES-256-GCM)`,
      { ...served.fields, address, port, size: served.image.size, dataPages, zeroPages },
    );
    const shutdown = (signal: string) => {
      logger.info("daemon.signal", `${signal}: shutting down`, { signal });
      server.close();
    };
    process.on("SIGINT", () => shutdown("SIGINT"));
    process.on("SIGTERM", () => shutdown("SIGTERM"));
    await server.run();
    server.close();
    return 0;
  } finally {
    metrics?.stop();
    served.close();
  }
}

function openLocal(config: PageServerConfig): Served {
  const image = openImage(config.mem, { ramblock: config.ramblock, wholeFile: config["whole-file"] });
  return {
    image,
    imageId: imageIdentity(image),
    wholeFile: config["whole-file"],
    summary: config["whole-file"] ? `whole file ${image.path}` : image.format === "raw" ? `raw image ${image.path}` : `mapped-ram image ${image.path} block ${image.blockName}`,
    fields: { format: image.format, path: image.path, block: image.blockName },
    close: () => image.close(),
  };
}

/** `--mem STORE/NAME`: the page server answers from verified chunks of the store, through the host cache. */
async function openStore(config: PageServerConfig, logger: Logger): Promise<Served> {
  const store = await openServedStore(config.mem, {
    cacheDir: config["cache-dir"],
    cacheSize: config["cache-size"],
    s3Endpoint: config["s3-endpoint"],
    storeParallel: config["store-parallel"],
    deadlineMs: config["store-deadline"],
    logger,
  });
  return {
    image: store,
    imageId: store.imageId,
    summary: store.summary,
    fields: { ...store.fields, format: "store", path: config.mem },
    attach: (loop) => store.attach(loop),
    close: () => store.close(),
  };
}

/**
 * Names the served bytes without reading them: the file's identity and modification time, the
 * block, and the zero map. A page server restarted on the same file gives the same id; a
 * replaced or rewritten file gives another, and clients mid-restore refuse it.
 */
export function imageIdentity(image: SnapshotImage): Uint8Array {
  const st = statSync(image.path, { bigint: true });
  const h = createHash("sha256");
  h.update(`${image.format}\0${image.blockName ?? ""}\0${image.size}\0${st.dev}\0${st.ino}\0${st.size}\0${st.mtimeNs}\0`);
  h.update(zeroMapBytes(image.zero));
  return new Uint8Array(h.digest().subarray(0, 16));
}
