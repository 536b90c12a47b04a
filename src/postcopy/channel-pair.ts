// The postcopy client's two connections to the page server, like QEMU's postcopy-preempt
// channel: faults go on the urgent one, so they never queue behind background bytes already
// sitting in kernel socket buffers. This module keeps them up: it reconnects with backoff, pings
// a connection that owes replies and went quiet, gives up one silent for too long, checks that a
// page server it reconnects to serves the same image, and fails the VM once it has been without a
// page server that delivers for the deadline (its owner kills its VMM, or qemu-restore fails).
// What a lost connection owed goes out again (the client's `takeBack`): pages are never guessed.
// Two clients use it: the daemon's VmClient (a VM's pages) and qemu-restore's range client (byte
// ranges of a snapshot file; no VM id).
import type { RequesterContext } from "../sources/port.ts";
import type { ClientChannel, LostKind } from "./client-channel.ts";
import type { ImageInfo } from "./protocol.ts";

export const URGENT = 0;
export const BACKGROUND = 1;
const CHANNEL_NAMES = ["urgent", "background"];

const RECONNECT_FIRST_MS = 50;
const RECONNECT_MAX_MS = 1000;
/** A connection silent this long while it owes us replies is given up (then pinged at half of it). */
const DEAD_AFTER_MAX_MS = 5000;
const DEAD_AFTER_MIN_MS = 500;
/** How often connection health and the deadline are looked at. */
const TICK_MAX_MS = 250;

/** What the pair needs of its owner: a loop, a logger, and whom to tell it gave up. */
export type PairContext = Pick<RequesterContext, "loop" | "logger" | "fail">;

export interface PairTarget {
  url: string;
  /** What the page server said at startup; every later connection must say the same. */
  info: ImageInfo;
  deadlineMs: number;
}

/** What the pair needs of the client it connects. */
export interface PairClient {
  /** Opens connection i (URGENT or BACKGROUND), reporting to `onReady`, `onLost` and `progress`. */
  open(i: number): ClientChannel;
  /** Requests sent and queued (not the sweep's): none means a reconnected server is back at once. */
  outstanding(): number;
  /** Every request not answered yet (for the failure message). */
  unanswered(): number;
  /** Whether connection i owes us replies. */
  owes(i: number): boolean;
  /** Connection i was lost: what it owed goes out again, first. Returns how many requests. */
  takeBack(i: number): number;
  /** Connection i is up: send what waits for it. */
  resume(i: number): void;
}

export class ChannelPair {
  private readonly channels: (ClientChannel | undefined)[] = [undefined, undefined];
  private readonly backoff = [RECONNECT_FIRST_MS, RECONNECT_FIRST_MS];
  private readonly cancelReconnect: ((() => void) | undefined)[] = [undefined, undefined];
  /**
   * Since when this VM has been without a working page server: set when a connection is lost
   * (or was never up), cleared only by progress (a DATA frame, or both connections up with
   * nothing owed). A server that reconnects but never delivers is still "without".
   */
  private stallSince: number | undefined;
  /** Per connection: the last DATA frame, or when it started owing us replies. */
  private readonly waitingSince = [0, 0];
  private readonly deadAfterMs: number;
  private lastError = "not connected yet";
  private everConnected = false;
  private outageLogged = false;
  private cancelTick: () => void = () => {};
  private closed = false;

  /** "vm N: " before messages (none for qemu-restore), and what the deadline means. */
  private readonly who: string;
  private readonly fate: string;

  constructor(
    /** The daemon's VM, or undefined for qemu-restore's snapshot file. */
    private readonly vmId: number | undefined,
    private readonly ctx: PairContext,
    private readonly target: PairTarget,
    private readonly counters: { tampered: number; reconnects: number },
    private readonly client: PairClient,
  ) {
    // Until the page server delivers, the VM is "without a page server": the deadline runs.
    this.stallSince = performance.now();
    this.deadAfterMs = Math.max(DEAD_AFTER_MIN_MS, Math.min(DEAD_AFTER_MAX_MS, target.deadlineMs / 2));
    this.who = vmId === undefined ? "" : `vm ${vmId}: `;
    this.fate = vmId === undefined ? "the restore fails" : "the VM is killed";
  }

  /** Opens both connections and starts watching them. */
  start(): void {
    this.connect(URGENT);
    this.connect(BACKGROUND);
    this.tick();
  }

  /** Connection i, if it is up. */
  ready(i: number): ClientChannel | undefined {
    const ch = this.channels[i];
    return ch?.ready ? ch : undefined;
  }

  /** Connection i (that is `ch`) starts owing us replies: its silence and progress clocks start now. */
  startOwing(i: number, ch: ClientChannel): void {
    ch.lastRxAt = performance.now();
    this.waitingSince[i] = ch.lastRxAt;
  }

  private connect(i: number): void {
    this.cancelReconnect[i] = undefined;
    if (this.closed) return;
    this.channels[i] = this.client.open(i);
  }

  onReady(i: number, ch: ClientChannel, info: ImageInfo): void {
    const want = this.target.info;
    if (info.size !== want.size || info.pages !== want.pages || !sameBytes(info.id, want.id) || !info.wholeFile !== !want.wholeFile) {
      ch.close();
      this.channels[i] = undefined;
      return this.ctx.fail("BAD_FRAME", `page server ${this.target.url} now serves a different image (${info.size} bytes, id ${hex(info.id)}; we started from ${want.size} bytes, id ${hex(want.id)})`);
    }
    this.backoff[i] = RECONNECT_FIRST_MS;
    if (this.channels.every((c) => c?.ready)) {
      this.everConnected = true;
      // Back in business if nothing is owed; otherwise the first DATA frame says so.
      if (this.client.outstanding() === 0) this.recovered();
    }
    this.client.resume(i);
  }

  onLost(i: number, reason: string, kind: LostKind, quietMs = 0): void {
    this.channels[i] = undefined;
    if (this.closed) return;
    this.lastError = reason;
    // Whatever was sent on that connection goes out again, first, in the order it was asked for.
    const resend = this.client.takeBack(i);
    this.stallSince ??= performance.now() - quietMs;
    const vm = this.vmId;
    const url = this.target.url;
    const deadlineMs = this.target.deadlineMs;
    if (kind === "tampered") {
      // Every one is worth a line: someone on the path changes, replays or cuts our traffic.
      this.counters.tampered++;
      this.ctx.logger.error(
        "remote.tampered",
        `${this.who}${CHANNEL_NAMES[i]} channel to ${url}: ${reason}; nothing of it installed, connection dropped, ` +
          `${resend} requests to re-send (${this.fate} if the page server does not deliver within ${deadlineMs} ms)`,
        { vm, url, channel: CHANNEL_NAMES[i], reason, resend, deadlineMs },
      );
    } else if (!this.outageLogged) {
      this.outageLogged = true;
      const level = kind === "auth" || kind === "version" || kind === "protocol" ? "error" : "warn";
      this.ctx.logger.log(
        level,
        "remote.lost",
        `${this.who}${this.everConnected ? "lost the" : "cannot reach the"} page server ${url} (${CHANNEL_NAMES[i]} channel: ${reason}); ` +
          `${resend} requests to re-send; reconnecting, ${this.fate} if it is not back within ${deadlineMs} ms`,
        { vm, url, channel: CHANNEL_NAMES[i], reason, kind, resend, deadlineMs, connected: this.everConnected },
      );
    } else {
      this.ctx.logger.debug("remote.channel_lost", `${this.who}${CHANNEL_NAMES[i]} channel: ${reason}`, { vm, channel: CHANNEL_NAMES[i], reason, kind });
    }
    const delay = this.backoff[i]!;
    this.backoff[i] = Math.min(RECONNECT_MAX_MS, delay * 2);
    this.cancelReconnect[i] = this.ctx.loop.after(delay, () => this.connect(i));
  }

  /** A DATA frame we wait for arrived on connection i: the page server delivers. */
  progress(i: number): void {
    this.waitingSince[i] = performance.now();
    if (this.stallSince !== undefined && this.channels.every((c) => c?.ready)) this.recovered();
  }

  private recovered(): void {
    if (this.stallSince === undefined) return;
    const stalled = performance.now() - this.stallSince;
    this.stallSince = undefined;
    if (this.outageLogged) {
      this.counters.reconnects++;
      this.ctx.logger.info("remote.back", `${this.who}page server ${this.target.url} is back after ${stalled.toFixed(0)} ms; outstanding requests re-sent`, {
        vm: this.vmId, url: this.target.url, stalledMs: stalled,
      });
    } else {
      this.ctx.logger.debug("remote.delivering", `${this.who}page server ${this.target.url} delivering after ${stalled.toFixed(1)} ms`, {
        vm: this.vmId, url: this.target.url, stalledMs: stalled,
      });
    }
    this.outageLogged = false;
  }

  private giveUp(why: string): void {
    if (this.closed) return;
    this.ctx.fail("PEER_GONE", `${why} (last: ${this.lastError}); ${this.client.unanswered()} requests unanswered`);
  }

  /**
   * Connection health, a few times a second: ping a connection that owes us replies and has
   * been quiet; give it up when silent for too long; fail the VM past the deadline.
   */
  private tick(): void {
    const every = Math.min(TICK_MAX_MS, this.target.deadlineMs / 4);
    this.cancelTick = this.ctx.loop.after(every, () => {
      if (this.closed) return;
      const now = performance.now();
      const deadline = this.target.deadlineMs;
      for (let i = 0; i < 2; i++) {
        const ch = this.channels[i];
        if (!ch?.ready) continue;
        if (!this.client.owes(i)) continue;
        const quiet = now - ch.lastRxAt;
        if (quiet >= this.deadAfterMs) {
          ch.close();
          this.onLost(i, `no reply for ${(quiet / 1000).toFixed(1)} s`, "timeout", quiet);
          if (this.closed) return;
        } else if (quiet >= this.deadAfterMs / 2) {
          ch.ping();
        } else if (now - this.waitingSince[i]! >= deadline) {
          // It answers pings but sends no pages.
          this.lastError = `no page data on the ${CHANNEL_NAMES[i]} connection for ${(deadline / 1000).toFixed(1)} s`;
          return this.giveUp(`page server ${this.target.url} delivered nothing for ${deadline} ms`);
        }
      }
      if (this.stallSince !== undefined && now - this.stallSince >= deadline) {
        if (!this.channels.every((c) => c?.ready)) return this.giveUp(`no page server at ${this.target.url} for ${deadline} ms`);
        this.lastError = "connected and authenticated, but no page data came";
        return this.giveUp(`page server ${this.target.url} delivered nothing for ${deadline} ms`);
      }
      this.tick();
    });
  }

  /** Closes both connections and stops reconnecting and watching. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.cancelTick();
    for (let i = 0; i < 2; i++) {
      this.cancelReconnect[i]?.();
      this.channels[i]?.close();
      this.channels[i] = undefined;
    }
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString("hex").slice(0, 16);
}
