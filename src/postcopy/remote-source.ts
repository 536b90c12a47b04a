// `--mem tcp://HOST:PORT`: pages come from `snapload page-server` (postcopy). At startup one
// probe connection learns the image's size and zero map (what handshakes and the handler table
// need); then every VM gets its own pair of connections (src/postcopy/vm-client.ts), which also
// pulls every page the VM has not touched, so each VM ends detached from the network.
import { ConfigError, SnaploadError } from "../core/errors.ts";
import { EventLoop } from "../core/event-loop.ts";
import type { ZeroMap } from "../sources/image/snapshot-image.ts";
import { type HostPort, parseTcpUrl, resolveHost } from "./address.ts";
import { checkCrypto } from "./aead.ts";
import { readTokenFile } from "./auth.ts";
import { ClientChannel } from "./client-channel.ts";
import { type ImageInfo, Role, zeroMapFromBytes } from "./protocol.ts";
import { VmClient } from "./vm-client.ts";
import type { OpenedSource, RemoteBackend, RemoteSource, SourceOptions } from "../sources/port.ts";

const PROBE_RETRY_FIRST_MS = 100;
const PROBE_RETRY_MAX_MS = 1000;

export async function openRemoteSource(url: string, opts: SourceOptions): Promise<OpenedSource> {
  // --ramblock is for the daemon's local mapped-ram files; the page server picks its own block.
  if (opts.tokenFile === undefined) throw new ConfigError(`--mem ${url}: a page server needs --token-file (the secret both sides share)`);
  const token = readTokenFile(opts.tokenFile, opts.logger);
  checkCrypto(); // at startup, not at the first connection

  const addr = await resolveHost(parseTcpUrl(url), `--mem ${url}`);
  const { info, zero } = await probe(url, addr, token, opts);
  if (info.wholeFile) {
    throw new ConfigError(`--mem ${url}: the page server serves a whole snapshot file (page-server --whole-file, for qemu-restore), not guest memory; start it without --whole-file`);
  }
  // No local bytes: everything comes through the requester.
  const backend: RemoteBackend = { kind: "remote", size: info.size, zero, description: `page server ${url}` };
  const sweep = opts.populate !== "none";
  const target = { url, addr, token, info, zero, deadlineMs: opts.deadlineMs, sweep };
  const source: RemoteSource = {
    kind: "remote",
    backend,
    openRequester: (vm, ctx) => new VmClient(vm, ctx, target),
  };
  return {
    source,
    summary: `page server ${url}, ${info.size} bytes (${info.dataPages} data, ${info.pages - info.dataPages} zero pages), ${sweep ? "background completion" : "on demand only (--populate none)"}, deadline ${opts.deadlineMs} ms`,
    fields: { format: "page-server", url, dataPages: info.dataPages, zeroPages: info.pages - info.dataPages, background: sweep, deadlineMs: opts.deadlineMs },
    close: () => {},
  };
}

/**
 * Fetches the image description and zero map, retrying an unreachable server until the deadline.
 * A refused token or protocol version is final: retrying cannot fix it.
 */
export async function probe(url: string, addr: HostPort, token: Buffer, opts: SourceOptions): Promise<{ info: ImageInfo; zero: ZeroMap }> {
  const loop = new EventLoop();
  const started = performance.now();
  let delay = PROBE_RETRY_FIRST_MS;
  let result: { info: ImageInfo; zero: ZeroMap } | undefined;
  let failure: SnaploadError | undefined;
  let warned = false;
  const attempt = () => {
    const ch: ClientChannel = new ClientChannel(loop, addr, token, Role.PROBE, true, {
      ready: (info, bits) => {
        try {
          result = { info, zero: zeroMapFromBytes(bits!, info.pages) };
        } catch (e) {
          failure = new SnaploadError("BAD_FRAME", `page server ${url}: ${(e as Error).message}`);
        }
        ch.close();
        loop.stop();
      },
      dataTarget: () => -1,
      data: () => {},
      requestError: () => {},
      lost: (reason, kind) => {
        if (kind === "auth" || kind === "version" || kind === "refused") {
          failure = new SnaploadError(kind === "auth" ? "AUTH_FAILED" : "BAD_FRAME", `page server ${url}: ${reason}`);
          return loop.stop();
        }
        const left = opts.deadlineMs - (performance.now() - started);
        if (left <= 0) {
          failure = new SnaploadError("PEER_GONE", `page server ${url} not reachable within ${opts.deadlineMs} ms (--page-server-deadline): ${reason}`);
          return loop.stop();
        }
        if (!warned) {
          warned = true;
          opts.logger.warn("remote.retrying", `page server ${url}: ${reason}; retrying for up to ${opts.deadlineMs} ms`, { url, reason, deadlineMs: opts.deadlineMs });
        }
        loop.after(Math.min(delay, left), attempt);
        delay = Math.min(PROBE_RETRY_MAX_MS, delay * 2);
      },
    }, Math.max(100, Math.min(5000, opts.deadlineMs)));
  };
  attempt();
  try {
    await loop.run();
  } finally {
    loop.close();
  }
  if (failure !== undefined) throw failure;
  if (result === undefined) throw new SnaploadError("PEER_GONE", `page server ${url}: startup interrupted`);
  const ms = performance.now() - started;
  opts.logger.debug("remote.ready", `page server ${url}: image of ${result.info.size} bytes in ${ms.toFixed(1)} ms`, { url, size: result.info.size, ms });
  return result;
}
