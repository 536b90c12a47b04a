// `snapload qemu-restore`: restores an unmodified QEMU guest from a mapped-ram snapshot by
// playing the postcopy migration source. The guest runs as soon as its device state is loaded;
// its RAM follows on request and in the background. The snapshot file is only read.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { QemuRestoreConfig } from "./qemu-restore.ts";
import { ConfigError, SnaploadError } from "../core/errors.ts";
import { Logger, formatBytes } from "../core/log.ts";
import { imageBackend } from "../sources/image/image-backend.ts";
import { openMappedRamBlocks } from "../sources/image/mapped-ram.ts";
import type { SnapshotImage } from "../sources/image/snapshot-image.ts";
import { TouchRecorder, readWorkingSet, writeWorkingSet } from "../scheduler/working-set.ts";
import { checkDestination, type DestinationPlan } from "../sinks/qemu/destination.ts";
import { isRemote, openRemoteFile } from "../sources/open-source.ts";
import { readRemoteSnapshot, remotePages, type RemoteSnapshot } from "../sinks/qemu/remote-snapshot.ts";
import { MigrationError, QemuPageSink, localPages, type OpenBlocks, formatMigrationAddress, parseMigrationAddress, percentile, type MigrationAddress, type SinkStats } from "../sinks/qemu/page-sink.ts";
import { EVENTS_CAPABILITY, waitMigrationState } from "../sinks/qemu/migration-status.ts";
import { QmpClient } from "../sinks/qemu/qmp.ts";
import { readDeviceState, readSnapshotStream, type SnapshotStream } from "../sinks/qemu/snapshot-stream.ts";
import { TARGET_PAGE } from "../sinks/qemu/stream.ts";

export interface RestoreSummary {
  snapshot: string;
  preempt: boolean;
  blocks: number;
  pages: number;
  deviceStateBytes: number;
  timeToPackageMs: number;
  /** Where the time to running goes, on snapload's clock (ms since the command started; null without --qmp). */
  steps: { parsedMs: number; qmpConnectedMs: number | null; checkedMs: number | null; incomingMs: number | null };
  timeToRunningMs: number | null;
  timeToCompletionMs: number;
  requests: number;
  requestsInFlight: number;
  pagesOnRequest: number;
  pagesBackground: number;
  pagesPrefetched: number;
  /** Zero pages never sent: the destination reads them as zero after completion. */
  zeroPagesNotSent: number;
  latencyP50Ms: number | null;
  latencyP99Ms: number | null;
  bytesSent: number;
  bytesPreempt: number;
  status: string;
}

const RUNNING_POLL_MS = 2;
const PROGRESS_MS = 2000;
const HOLD_MAX_MS = 2000;

export async function qemuRestoreCommand(config: QemuRestoreConfig, out: (s: string) => void = (s) => process.stdout.write(s)): Promise<number> {
  const logger = new Logger(config["log-level"], { format: config["log-format"] });
  const t0 = performance.now();
  // QMP connects (greeting, capabilities negotiation) while the snapshot is parsed; nothing is
  // asked of QEMU until both are done and the checks pass.
  const qmpP = config.qmp === undefined ? undefined : QmpClient.connect(config.qmp);
  qmpP?.catch(() => {});
  const steps: RestoreSummary["steps"] = { parsedMs: 0, qmpConnectedMs: null, checkedMs: null, incomingMs: null };
  // A remote snapshot (page server, store) is read by range: its non-page parts now, its pages
  // as the guest asks and the background sweeps, each sent once present and verified.
  const remote = isRemote(config.mem)
    ? await openRemoteFile(config.mem, {
        logger,
        deadlineMs: config["page-server-deadline"],
        ...(config["token-file"] !== undefined ? { tokenFile: config["token-file"] } : {}),
        ...(config["cache-dir"] !== undefined ? { cacheDir: config["cache-dir"] } : {}),
        ...(config["s3-endpoint"] !== undefined ? { s3Endpoint: config["s3-endpoint"] } : {}),
      })
    : undefined;
  let snapshot: RemoteSnapshot | undefined;
  let stream: SnapshotStream;
  try {
    snapshot = remote ? await readRemoteSnapshot(remote) : undefined;
    stream = snapshot?.stream ?? readSnapshotStream(config.mem);
  } catch (e) {
    remote?.close();
    void qmpP?.then((q) => q.close(), () => {});
    throw e;
  }
  if (stream.refusals.length > 0) {
    remote?.close();
    void qmpP?.then((q) => q.close(), () => {});
    throw new SnaploadError("BAD_IMAGE", `${config.mem} cannot be restored by qemu-restore:\n  ${stream.refusals.join("\n  ")}`);
  }
  const deviceState = snapshot?.deviceState ?? readDeviceState(stream);
  const step = (what: string) => {
    const ms = round(performance.now() - t0);
    logger.debug("qemu.step", `${what} at ${ms.toFixed(1)} ms`, { step: what, ms });
  };
  step("snapshot parsed");
  steps.parsedMs = round(performance.now() - t0);
  const images: SnapshotImage[] = [];
  let qmp: QmpClient | undefined;
  let dir: string | undefined;
  try {
    const prefetch = config.prefetch === undefined ? undefined : await loadPrefetch(config.prefetch, stream);
    const recorder = config.record === undefined ? undefined : new TouchRecorder(stream.ram.totalRam / TARGET_PAGE);
    const blockBase = blockStarts(stream);

    let plan: DestinationPlan;
    let eventsSince = 0;
    // Checked before anything is asked of QEMU, so a typo leaves it untouched.
    const given = config.to === undefined ? undefined : parseMigrationAddress(config.to);
    let addr: MigrationAddress;
    const preempt = config.preempt;
    if (config.qmp !== undefined) {
      qmp = await qmpP!;
      step("QMP connected");
      steps.qmpConnectedMs = round(performance.now() - t0);
      plan = await checkDestination(qmp, stream);
      step("destination checked");
      steps.checkedMs = round(performance.now() - t0);
      if (plan.extra.length > 0) logger.warn("qemu.extra_blocks", `destination RAM blocks not in the snapshot stay zero: ${plan.extra.join(", ")}`, { blocks: plan.extra });
      // `events`: QEMU reports RESUME, failure and completion as events the monitor below waits on.
      const caps: { capability: string; state: boolean }[] = [{ capability: "postcopy-ram", state: true }, EVENTS_CAPABILITY];
      if (preempt) caps.push({ capability: "postcopy-preempt", state: true });
      if (given) addr = given;
      else {
        dir = mkdtempSync(join(tmpdir(), "snapload-qemu-"));
        addr = { kind: "unix", path: join(dir, "migrate.sock") };
      }
      await qmp.execute("migrate-set-capabilities", { capabilities: caps });
      eventsSince = qmp.eventMark;
      try {
        await qmp.execute("migrate-incoming", { uri: formatMigrationAddress(addr), "exit-on-error": false });
      } catch (e) {
        // Leave the destination as we found it (e.g. the --to address was taken).
        await qmp.execute("migrate-set-capabilities", { capabilities: caps.map((c) => ({ ...c, state: false })) }).catch(() => {});
        throw e;
      }
      step("migrate-incoming issued");
      steps.incomingMs = round(performance.now() - t0);
    } else {
      // Without QMP the user has set the capabilities and called migrate-incoming; page sizes
      // are assumed to be the target page (no hugetlbfs).
      addr = given!;
      plan = { blocks: stream.ram.blocks.map((b) => ({ name: b.name, usedLength: b.usedLength })), pageSizeSummary: TARGET_PAGE, extra: [] };
    }

    // Every RAM block as the image backend `serve` uses for a local file (page-source.ts), from
    // one parse, opened by the sink once the device state is on its way.
    const openBlocks: OpenBlocks = (arrivals) => {
      if (remote) return remotePages(remote, stream.ram.blocks, snapshot!.zero, arrivals);
      images.push(...openMappedRamBlocks(config.mem, false));
      const backends = images.map((image, i) => {
        if (image.blockName !== stream.ram.blocks[i]!.name) throw new MigrationError(`${config.mem} changed while restoring`);
        return imageBackend(image);
      });
      step("RAM blocks mapped");
      return localPages(backends);
    };
    // With QMP, the background stream starts once the guest is seen running (or paused, with -S),
    // or after HOLD_MAX_MS should the status never say so.
    let seenRunning = () => {};
    const running = new Promise<void>((r) => (seenRunning = r));
    const holdTimer = setTimeout(seenRunning, HOLD_MAX_MS);
    const sink = new QemuPageSink(
      plan.blocks,
      openBlocks,
      {
        sectionId: stream.ramSectionId,
        header: stream.header,
        deviceState,
        pageSizeSummary: plan.pageSizeSummary,
        preempt,
        faultAround: config["fault-around"],
        sendZeroPages: config["send-zero-pages"],
        ...(config["background-rate"] ? { backgroundRate: config["background-rate"] * 1024 * 1024 } : {}),
        logger,
        ...(prefetch ? { prefetch } : {}),
        ...(qmp ? { backgroundAfter: running } : {}),
        ...(recorder ? { onRequest: (bi: number, page: number) => recorder.add(blockBase[bi]! + page) } : {}),
      },
    );
    logger.info(
      "qemu.restoring",
      `restoring ${config.mem} (${stream.machine}, ${stream.ram.blocks.length} RAM blocks, ${formatBytes(stream.ram.totalRam)}, device state ${formatBytes(deviceState.length)}) to ${formatMigrationAddress(addr)}${preempt ? " with postcopy-preempt" : ""}`,
      { mem: config.mem, machine: stream.machine, blocks: stream.ram.blocks.length, ramBytes: stream.ram.totalRam, deviceStateBytes: deviceState.length, address: formatMigrationAddress(addr), preempt },
    );

    let runningMs: number | null = null;
    let monitor: Promise<void> = Promise.resolve();
    let stopMonitor = false;
    let unwatch = () => {};
    // Killed now, the guest keeps running but blocks on the first page it still lacks.
    const onSignal = (sig: NodeJS.Signals) => {
      logger.error("qemu.interrupted", `${sig} during the restore: the destination cannot complete without snapload; its guest will block on the first page it still lacks`, { signal: sig });
      if (dir) rmSync(dir, { recursive: true, force: true }); // exit() skips the finally below
      process.exit(128 + (sig === "SIGINT" ? 2 : 15));
    };
    process.once("SIGINT", onSignal);
    process.once("SIGTERM", onSignal);
    const sinkStartMs = performance.now() - t0;
    const runPromise = sink.run(addr, () => {
      const q = qmp;
      if (!q) return;
      const seen = (paused: boolean) => {
        if (runningMs !== null) return;
        runningMs = performance.now() - t0;
        seenRunning();
        logger.info("qemu.running", `guest ${paused ? "loaded (paused: -S)" : "running"} after ${runningMs.toFixed(1)} ms`, { ms: round(runningMs), paused });
      };
      const lostQmp = (e: unknown) => {
        if (stopMonitor) return;
        stopMonitor = true;
        sink.abort(new MigrationError(`lost QEMU's monitor while restoring, the restore cannot complete: ${(e as Error).message}`, { qmpLost: true }, { cause: e }));
      };
      // Watch the destination on its events (from the mark taken before migrate-incoming, so none
      // is missed): RESUME when the guest runs, MIGRATION when it fails or pauses postcopy.
      unwatch = q.on((e) => {
        if (stopMonitor) return;
        if (e.event === "RESUME") seen(false);
        else if (e.event === "MIGRATION" && (e.data.status === "failed" || e.data.status === "postcopy-paused")) {
          const status = e.data.status;
          stopMonitor = true;
          // The event carries the status only; query-migrate adds QEMU's reason.
          void q.execute<{ "error-desc"?: string }>("query-migrate").then(
            (m) => sink.abort(migrationFailed(status, m["error-desc"])),
            () => sink.abort(migrationFailed(status, undefined)),
          );
        }
      }, eventsSince);
      void q.lost().then(lostQmp);
      // Polling remains for one case: a destination started with -S goes from inmigrate to paused
      // with no event (QEMU sends RESUME only when it starts the vCPUs), so query-status is asked
      // until the guest is seen running or paused.
      monitor = (async () => {
        while (!stopMonitor && runningMs === null) {
          try {
            const st = await q.execute<{ status: string }>("query-status");
            if (st.status === "running" || st.status === "paused") seen(st.status === "paused");
          } catch (e) {
            lostQmp(e);
            return;
          }
          if (runningMs === null) await Bun.sleep(RUNNING_POLL_MS);
        }
      })();
    });
    const progress = setInterval(() => {
      const { sent, of } = sink.progress;
      logger.info("qemu.progress", `progress: ${sent}/${of} data pages sent (${((100 * sent) / of).toFixed(0)}%), ${sink.stats.requests} requests served`, { sent, of, requests: sink.stats.requests });
    }, PROGRESS_MS);
    const timer = setTimeout(() => sink.abort(new MigrationError(`the restore did not complete within ${config["completion-timeout"]} ms`)), config["completion-timeout"]);
    let stats: SinkStats;
    const stats0 = sink.stats;
    try {
      stats = await runPromise;
    } catch (e) {
      stopMonitor = true;
      // QEMU's own account, when it has one, says more than a closed socket.
      const qmpLost = e instanceof MigrationError && e.context.qmpLost === true;
      const why = qmp && !qmpLost ? await destinationReason(qmp) : undefined;
      if (why && e instanceof MigrationError) throw new MigrationError(`${e.message}\n  destination: ${why}`, {}, { cause: e });
      if (!qmp && e instanceof MigrationError && stats0.requests === 0) {
        // Without --qmp the usual cause of a refusal before any page request is a capability the
        // user did not set (a postcopy destination asks for pages as soon as it loads devices).
        throw new MigrationError(
          `${e.message}\n  (if the destination refused the stream: with --to, set postcopy-ram${preempt ? " and postcopy-preempt" : ""} on the destination before migrate-incoming, and keep mapped-ram and multifd off)`,
          {},
          { cause: e },
        );
      }
      throw e;
    } finally {
      clearTimeout(timer);
      clearTimeout(holdTimer);
      clearInterval(progress);
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
      stopMonitor = true;
      unwatch();
      await monitor;
    }

    let status = "completed (SHUT 0)";
    if (qmp) status = await waitCompleted(qmp);
    const doneMs = performance.now() - t0;
    if (recorder && config.record) {
      writeWorkingSet(config.record, recorder.order, stream.ram.totalRam);
      logger.info("qemu.recorded", `recorded ${recorder.length} requested pages to ${config.record}`, { path: config.record, pages: recorder.length });
    }
    const lat = [...stats.latenciesMs].sort((a, b) => a - b);
    const summary: RestoreSummary = {
      snapshot: config.mem,
      preempt,
      blocks: plan.blocks.length,
      pages: sink.totalPages,
      deviceStateBytes: deviceState.length,
      timeToPackageMs: round(sinkStartMs + stats.packageSentMs),
      steps,
      timeToRunningMs: runningMs === null ? null : round(runningMs),
      timeToCompletionMs: round(doneMs),
      requests: stats.requests,
      requestsInFlight: stats.requestsInFlight,
      pagesOnRequest: stats.pagesOnRequest,
      pagesBackground: stats.pagesBackground,
      pagesPrefetched: stats.pagesPrefetched,
      zeroPagesNotSent: sink.totalPages - sink.sentPages,
      latencyP50Ms: lat.length ? round(percentile(lat, 0.5)) : null,
      latencyP99Ms: lat.length ? round(percentile(lat, 0.99)) : null,
      bytesSent: stats.bytesMain + stats.bytesPreempt,
      bytesPreempt: stats.bytesPreempt,
      status,
    };
    out(config.json ? `${JSON.stringify(summary)}\n` : formatSummary(summary));
    return 0;
  } finally {
    if (remote) {
      const r = remote.report?.();
      if (r) logger.info("qemu.source", r.text, { ...r.fields, mem: config.mem });
      remote.close();
    }
    if (qmp) qmp.close();
    else void qmpP?.then((q) => q.close(), () => {}); // failed before it was needed
    for (const i of images) i.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

function migrationFailed(status: string, desc: string | undefined): MigrationError {
  if (status === "postcopy-paused") {
    return new MigrationError(
      `the destination paused postcopy (${desc ?? "no reason given"}): it refused part of the stream; the guest keeps running but any page it still lacks will block. See QEMU's stderr`,
    );
  }
  return new MigrationError(`the destination failed the migration: ${desc ?? "no reason given"} (QEMU prints the specific reason on its stderr)`);
}

async function destinationReason(qmp: QmpClient): Promise<string | undefined> {
  try {
    const m = await Promise.race([
      qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate"),
      Bun.sleep(2000).then(() => undefined),
    ]);
    if (!m) return undefined;
    return `migration ${m.status ?? "unknown"}${m["error-desc"] ? `: ${m["error-desc"]}` : ""}`;
  } catch (e) {
    return `QMP unreachable (${(e as Error).message})`;
  }
}

async function waitCompleted(qmp: QmpClient): Promise<string> {
  const m = await waitMigrationState(qmp, ["completed", "failed", "postcopy-paused"], 10_000);
  if (m.status === "completed") return "completed";
  if (m.status === "failed" || m.status === "postcopy-paused") throw migrationFailed(m.status, m["error-desc"]);
  throw new MigrationError(`the destination sent SHUT but reports "${m.status}", not completed`);
}

/** First 4 KiB page of each block in the whole-snapshot page numbering (working-set files). */
function blockStarts(stream: SnapshotStream): number[] {
  const out: number[] = [];
  let n = 0;
  for (const b of stream.ram.blocks) {
    out.push(n);
    n += b.usedLength / TARGET_PAGE;
  }
  return out;
}

async function loadPrefetch(path: string, stream: SnapshotStream): Promise<Uint32Array> {
  return readWorkingSet(path, stream.ram.totalRam);
}

function formatSummary(s: RestoreSummary): string {
  const ms = (v: number | null) => (v === null ? "n/a" : `${v.toFixed(1)} ms`);
  return [
    `restored ${s.snapshot}: ${s.status}`,
    `  time to device state sent: ${ms(s.timeToPackageMs)}`,
    `  time to guest running:     ${ms(s.timeToRunningMs)} (or loaded and paused, with -S)`,
    `  time to completion:        ${ms(s.timeToCompletionMs)}`,
    `  pages: ${s.pages} in ${s.blocks} blocks; on request ${s.pagesOnRequest} (${s.requests} requests, ${s.requestsInFlight} already in flight), background ${s.pagesBackground}, prefetched ${s.pagesPrefetched}, zero pages left to read as zero ${s.zeroPagesNotSent}`,
    `  request latency: p50 ${ms(s.latencyP50Ms)}, p99 ${ms(s.latencyP99Ms)} (request received -> page handed to the socket)`,
    `  bytes sent: ${s.bytesSent} (${formatBytes(s.bytesSent)}; ${s.bytesPreempt} on the preempt channel${s.preempt ? "" : ", off"})`,
    "",
  ].join("\n");
}
