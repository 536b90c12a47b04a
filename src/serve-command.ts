// `snapload serve`: opens the image, listens, serves until SIGINT/SIGTERM.
import type { ServeConfig } from "./config.ts";
import { imageBackend } from "./image-backend.ts";
import { openImage } from "./image/open-image.ts";
import { formatBytes, Logger } from "./log.ts";
import { Server } from "./server.ts";
import { readWorkingSet } from "./working-set.ts";

export async function serveCommand(config: ServeConfig): Promise<number> {
  const logger = new Logger(config["log-level"]);
  const image = openImage(config.mem, { ramblock: config.ramblock });
  const backend = imageBackend(image);
  const prefetch = config.prefetch !== undefined ? await readWorkingSet(config.prefetch, image.size) : undefined;
  const server = new Server({
    socketPath: config.socket,
    socketMode: config["socket-mode"],
    backend,
    faultAround: config["fault-around"],
    handshakeTimeoutMs: config["handshake-timeout"],
    onFatal: config["on-fatal"],
    prefetch,
    populate: config.populate,
    recordPath: config.record,
    logger,
  });
  server.listen();
  logger.info(
    `listening on ${config.socket}: ${backend.description}, ${formatBytes(image.size)} (${image.dataPages} data, ${image.zeroPages} zero pages), fault-around ${config["fault-around"]}, populate ${config.populate}${prefetch ? `, prefetching ${prefetch.length} pages` : ""}`,
  );
  const shutdown = (signal: string) => {
    logger.info(`${signal}: shutting down`);
    server.close();
  };
  process.on("SIGINT", () => shutdown("SIGINT"));
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGUSR1", () => server.writeRecordings());
  await server.run();
  server.close();
  image.close();
  return 0;
}
