// `snapload page-server`: opens the image, listens, serves until SIGINT/SIGTERM.
import { createHash } from "node:crypto";
import { statSync } from "node:fs";
import type { PageServerConfig } from "./page-server.ts";
import { openImage } from "../sources/image/open-image.ts";
import { openServedStore, type ServedStore } from "../sources/store/served-store.ts";
import { isStoreUrl } from "../sources/store/stores.ts";
import type { SnapshotImage } from "../sources/image/snapshot-image.ts";
import { formatBytes, Logger } from "../core/log.ts";
import { type MetricsEndpoint, startMetricsEndpoint } from "../metrics/endpoint.ts";
import { renderPageServerMetrics } from "../metrics/page-server-metrics.ts";
import { PageServer, type PageServerFaults } from "../postcopy/page-server.ts";
import { formatHostPort, parseHostPort, resolveHost } from "../postcopy/address.ts";
import { readTokenFile } from "../postcopy/auth.ts";
import { zeroMapBytes } from "../postcopy/protocol.ts";

export function pageServerCommand(config: PageServerConfig): Promise<number> {
  return runPageServer(config);
}

/** The page server of `config`, until SIGINT/SIGTERM; `faults` is for tests (see PageServerFaults). */
export async function runPageServer(config: PageServerConfig, faults?: PageServerFaults): Promise<number> {
  const logger = new Logger(config["log-level"], { format: config["log-format"] });
  const token = readTokenFile(config["token-file"], logger);
  const where = await resolveHost(parseHostPort(config.listen, "--listen", true), "--listen");
  if (isStoreUrl(config.mem)) return serveStore(config, logger, token, where);
  const image = openImage(config.mem, { ramblock: config.ramblock, wholeFile: config["whole-file"] });
  let metrics: MetricsEndpoint | undefined;
  try {
    const server = new PageServer({
      host: where.host,
      port: where.port,
      image,
      imageId: imageIdentity(image),
      wholeFile: config["whole-file"],
      token,
      logger,
      handshakeTimeoutMs: config["handshake-timeout"],
      maxPreauth: config["max-preauth"],
      maxPreauthPerAddress: config["max-preauth-per-address"],
      maxClients: config["max-clients"],
      faults,
    });
    if (config.metrics !== undefined) metrics = await startMetricsEndpoint(config.metrics, () => renderPageServerMetrics(server), logger);
    const port = server.listen();
    const what = config["whole-file"] ? `whole file ${image.path}` : image.format === "raw" ? `raw image ${image.path}` : `mapped-ram image ${image.path} block ${image.blockName}`;
    logger.info(
      "page_server.listening",
      `page server listening on ${formatHostPort({ host: where.host, port })}: ${what}, ${formatBytes(image.size)} (${image.dataPages} data, ${image.zeroPages} zero pages); channel authenticated and encrypted (AES-256-GCM)`,
      {
        address: formatHostPort({ host: where.host, port }), port, format: image.format, path: image.path, block: image.blockName,
        size: image.size, dataPages: image.dataPages, zeroPages: image.zeroPages,
      },
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
    image.close();
  }
}

/** `--mem STORE/NAME`: the page server answers from verified chunks of the store, through the host cache. */
async function serveStore(config: PageServerConfig, logger: Logger, token: Buffer, where: { host: string; port: number }): Promise<number> {
  const image: ServedStore = await openServedStore(config.mem, {
    cacheDir: config["cache-dir"],
    cacheSize: config["cache-size"],
    s3Endpoint: config["s3-endpoint"],
    storeParallel: config["store-parallel"],
    deadlineMs: config["store-deadline"],
    logger,
  });
  let metrics: MetricsEndpoint | undefined;
  try {
    const server = new PageServer({
      host: where.host,
      port: where.port,
      image,
      imageId: image.imageId,
      token,
      logger,
      handshakeTimeoutMs: config["handshake-timeout"],
      maxPreauth: config["max-preauth"],
      maxPreauthPerAddress: config["max-preauth-per-address"],
      maxClients: config["max-clients"],
    });
    image.attach(server.loop);
    if (config.metrics !== undefined) metrics = await startMetricsEndpoint(config.metrics, () => renderPageServerMetrics(server), logger);
    const port = server.listen();
    const zeroPages = image.zero.countZero();
    logger.info(
      "page_server.listening",
      `page server listening on ${formatHostPort({ host: where.host, port })}: ${image.summary}, ${formatBytes(image.size)} (${image.zero.pages - zeroPages} data, ${zeroPages} zero pages); channel authenticated and encrypted (AES-256-GCM)`,
      { ...image.fields, address: formatHostPort({ host: where.host, port }), port, format: "store", path: config.mem, size: image.size, dataPages: image.zero.pages - zeroPages, zeroPages },
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
    image.close();
  }
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
