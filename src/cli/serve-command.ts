// `snapload serve`: opens the sources, listens, serves until SIGINT/SIGTERM.
import { DEFAULT_FAULT_AROUND } from "./config.ts";
import type { ServeConfig } from "./serve.ts";
import { Logger } from "../core/log.ts";
import { type MetricsEndpoint, startMetricsEndpoint } from "../metrics/endpoint.ts";
import { renderServeMetrics } from "../metrics/serve-metrics.ts";
import { isPageServer, type OpenedSource, openSource } from "../sources/open-source.ts";
import { type Listener, Server } from "../daemon/server.ts";
import { warmUp } from "../daemon/warmup.ts";
import { logPostcopyWarmUp, warmUpPostcopy } from "../daemon/postcopy-warmup.ts";
import { SpinPolicy } from "../core/spin-policy.ts";
import { readWorkingSet } from "../scheduler/working-set.ts";

export async function serveCommand(config: ServeConfig): Promise<number> {
  const logger = new Logger(config["log-level"], { format: config["log-format"] });
  // 16 pages per fault won the fault-around sweep (README); a recording run defaults to one page
  // per fault, so the working set it writes holds what the guest touched and nothing more.
  const faultAround = config["fault-around"] ?? (config.record !== undefined ? 1 : DEFAULT_FAULT_AROUND);
  const opened: OpenedSource[] = [];
  let metrics: MetricsEndpoint | undefined;
  try {
    const listeners: Listener[] = [];
    const summaries: string[] = [];
    const facts: OpenedSource["fields"][] = [];
    for (let i = 0; i < config.socket.length; i++) {
      const mem = config.mem[config.mem.length === 1 ? 0 : i]!;
      // Sockets that share one --mem share one opened image.
      const src = config.mem.length === 1 && opened.length ? opened[0]! : await openSource(mem, {
        ramblock: config.ramblock,
        tokenFile: config["token-file"],
        deadlineMs: config["page-server-deadline"],
        populate: config.populate,
        logger,
        cacheDir: config["cache-dir"],
        cacheSize: config["cache-size"],
        s3Endpoint: config["s3-endpoint"],
        storeParallel: config["store-parallel"],
      });
      if (!opened.includes(src)) opened.push(src);
      const prefetch = config.prefetch !== undefined ? await readWorkingSet(config.prefetch, src.source.backend.size) : src.prefetch;
      listeners.push({ socketPath: config.socket[i]!, socketMode: config["socket-mode"], source: src.source, prefetch });
      facts.push(src.fields);
      summaries.push(`${src.summary}, fault-around ${faultAround}, populate ${config.populate ?? "none"}${prefetch ? `, prefetching ${prefetch.length} pages` : ""}`);
    }
    const server = new Server({
      listeners,
      faultAround,
      handshakeTimeoutMs: config["handshake-timeout"],
      onFatal: config["on-fatal"],
      populate: config.populate ?? "none",
      recordPath: config.record,
      logger,
    });
    server.loop.spin = new SpinPolicy(config["spin-us"]);
    const remotes = opened.flatMap((s) => (s.source.kind === "remote" ? [s.source] : []));
    const warm = await warmUp(server.loop, { sources: remotes, logger });
    logger.debug(
      "daemon.warm_up",
      warm
        ? `fault path warmed up in ${warm.ms.toFixed(1)} ms (${warm.synthetic} synthetic faults, ${warm.real} real faults${warm.real === 0 ? ": the real pass failed" : ""}` +
          `${warm.remoteReal !== undefined ? `; remote path: ${warm.remoteSynthetic} synthetic, ${warm.remoteReal} real${warm.remoteReal === 0 ? ": the real pass failed" : ""}` : ""})`
        : "fault path warm-up skipped (no userfaultfd)",
      { done: warm !== undefined && warm.real > 0, ms: warm?.ms, syntheticFaults: warm?.synthetic, realFaults: warm?.real, remoteSyntheticFaults: warm?.remoteSynthetic, remoteRealFaults: warm?.remoteReal },
    );
    // A page server's client is other code than the local fault path: warm it too (postcopy-warmup.ts).
    if (config.mem.some(isPageServer)) logPostcopyWarmUp(logger, "daemon.postcopy_warm_up", await warmUpPostcopy(server.loop));
    for (const s of opened) s.attach?.(server.loop);
    const shutdown = (signal: string) => {
      logger.info("daemon.signal", `${signal}: shutting down`, { signal });
      server.close();
    };
    // Before "listening on": a SIGTERM right after that line must still shut down cleanly.
    process.on("SIGINT", () => shutdown("SIGINT"));
    process.on("SIGTERM", () => shutdown("SIGTERM"));
    process.on("SIGUSR1", () => server.writeRecordings());
    // Before listen(): a metrics address that cannot be bound leaves no socket files behind.
    if (config.metrics !== undefined) metrics = await startMetricsEndpoint(config.metrics, () => renderServeMetrics(server.totals, server.vms), logger);
    server.listen();
    listeners.forEach((l, i) =>
      logger.info("daemon.listening", `listening on ${l.socketPath}: ${summaries[i]}`, {
        socket: l.socketPath, mem: config.mem[config.mem.length === 1 ? 0 : i], size: l.source.backend.size, faultAround,
        populate: config.populate ?? "none", prefetchPages: l.prefetch?.length, ...facts[i],
      }),
    );
    await server.run();
    server.close();
    return 0;
  } finally {
    metrics?.stop();
    for (const s of opened) s.close();
  }
}
