// `--metrics HOST:PORT`: GET /metrics answers the Prometheus text format, rendered per scrape.
// Bun's HTTP server runs on Bun's event loop, which the daemon's loop hands the thread to between
// epoll waits; a scrape never runs inside the fault path.
import { ConfigError } from "../core/errors.ts";
import type { Logger } from "../core/log.ts";
import { formatHostPort, parseHostPort, resolveHost } from "../postcopy/address.ts";

export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

export interface MetricsEndpoint {
  /** http://HOST:PORT/metrics, with the port actually bound. */
  readonly url: string;
  stop(): void;
}

export async function startMetricsEndpoint(address: string, render: () => string, logger: Logger): Promise<MetricsEndpoint> {
  const where = await resolveHost(parseHostPort(address, "--metrics", true), "--metrics");
  let server: ReturnType<typeof Bun.serve>;
  try {
    server = Bun.serve({
      hostname: where.host,
      port: where.port,
      fetch(req) {
        const path = new URL(req.url).pathname;
        if (path !== "/metrics") return new Response("snapload: the metrics are at /metrics\n", { status: 404 });
        if (req.method !== "GET" && req.method !== "HEAD") return new Response(null, { status: 405, headers: { allow: "GET, HEAD" } });
        return new Response(render(), { headers: { "content-type": METRICS_CONTENT_TYPE } });
      },
    });
  } catch (e) {
    throw new ConfigError(`--metrics ${address}: cannot listen (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, { address }, { cause: e });
  }
  const bound = formatHostPort({ host: where.host, port: server.port ?? where.port });
  const url = `http://${bound}/metrics`;
  logger.info("metrics.listening", `metrics on ${url}`, { address: bound, port: server.port, url });
  return { url, stop: () => void server.stop(true) };
}
