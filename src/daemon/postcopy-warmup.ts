// JIT warm-up of postcopy (`--mem tcp://…`, and `snapload page-server`): before the first VM, a
// page server of our own on a loopback ephemeral port, on the caller's event loop, serves a small
// image held in memory to a VmClient of ours that installs it into a userfaultfd-registered
// buffer of ours. Both ends run their real code with real keys: handshake, sealing from the
// mapping and sending (server), frame reading, header and payload opening, in-place decryption,
// requests urgent and background, installing (client). Measured before this: the first postcopy
// restore after start spent ~155 ms of the daemon's CPU (and ~100 ms of the page server's) in
// the JIT compiler threads, on the CPU the guest's faults are served from.
//
// No real VM is touched, nothing listens beyond 127.0.0.1, no file is written, and everything is
// closed again (sockets, uffd, memory, timers). Bounded in time: rounds stop at the deadline.
import { randomBytes } from "node:crypto";
import type { EventLoop } from "../core/event-loop.ts";
import { EPOLLIN } from "../core/ffi.ts";
import { type Logger, silentLogger } from "../core/log.ts";
import { IMAGE_PAGE } from "../sources/image/snapshot-image.ts";
import type { RequesterContext } from "../sources/port.ts";
import { writeFaultMessage } from "../sinks/uffd/uffd-messages.ts";
import { PageServer } from "../postcopy/page-server.ts";
import type { ImageInfo } from "../postcopy/protocol.ts";
import { type RemoteTarget, VmClient } from "../postcopy/vm-client.ts";
import { WarmUpVm } from "./warmup.ts";

/**
 * 2 MiB: the first quarter all data (requests of many pages, sent in MAX_CHUNK frames, as a
 * restore's bulk), the rest alternating data and zero pages (one frame per page: the per-frame
 * code, which is what warms, runs most often per byte moved).
 */
const PAGES = 512;
const BULK_PAGES = PAGES / 4;
const LOOPBACK = "127.0.0.1";
/** Default time budget: no round starts after it is spent. */
export const POSTCOPY_WARM_UP_MS = 250;
/** Past this, the round under way is abandoned (a machine too loaded for one round in time). */
const hardDeadline = (budgetMs: number) => 2 * budgetMs + 250;
const MAX_ROUNDS = 60;
/** Synthetic faults fed per delivery: the urgent path (request, hurry, urgent reply) runs too. */
const FAULTS_PER_TURN = 2;

export interface PostcopyWarmUpResult {
  /** Rounds completed: the whole image installed and checked against the served bytes. */
  rounds: number;
  /** Pages installed over all rounds. */
  pages: number;
  /** Requests the client sent (urgent and background) over all rounds. */
  requests: number;
  ms: number;
  /** False when a round failed (wrong bytes, a refused connection, the hard deadline): the daemon starts all the same. */
  ok: boolean;
  /** Why, when not ok. */
  reason?: string;
}

/** The warm-up's guest: its first quarter all data, then data and zero pages alternating. */
function openVm(): WarmUpVm | undefined {
  return WarmUpVm.open({
    pages: PAGES,
    requester: "own",
    fill: (bytes, zero) => {
      for (let p = 0; p < PAGES; p++) {
        if (p >= BULK_PAGES && p % 2 === 1) zero.setZero(p);
        else bytes.fill((p * 7 + 1) & 0xff, p * IMAGE_PAGE, (p + 1) * IMAGE_PAGE);
      }
    },
  });
}

/**
 * Runs rounds until `budgetMs` is spent (at least one, unless it fails or `hardMs` passes) on
 * `loop`, which must not be running (the daemon's, before it listens). Undefined without userfaultfd.
 */
export async function warmUpPostcopy(loop: EventLoop, budgetMs = POSTCOPY_WARM_UP_MS, maxRounds = MAX_ROUNDS, hardMs = hardDeadline(budgetMs)): Promise<PostcopyWarmUpResult | undefined> {
  const t0 = performance.now();
  const result: PostcopyWarmUpResult = { rounds: 0, pages: 0, requests: 0, ms: 0, ok: true };
  let w: WarmUpVm | undefined;
  try {
    w = openVm();
  } catch (e) {
    // The uffd would not register (UFFDIO_API / REGISTER): the daemon starts all the same.
    return { ...result, ok: false, reason: (e as Error).message, ms: performance.now() - t0 };
  }
  if (w === undefined) return undefined;
  const { uffd, guest, source, zero, vm, len } = w;
  let server: PageServer | undefined;
  let client: VmClient | undefined;
  let uffdToken = -1;
  const cancels: (() => void)[] = [];
  try {
    const token = randomBytes(32);
    const imageId = randomBytes(16);
    server = new PageServer({
      host: LOOPBACK, port: 0, image: { size: len, zero, base: source.address }, imageId, token, logger: silentLogger,
      handshakeTimeoutMs: hardMs + 1000, maxPreauth: 4, maxPreauthPerAddress: 4, maxClients: 4,
    }, loop);
    const port = server.listen();
    const info: ImageInfo = { size: len, pages: PAGES, dataPages: PAGES - zero.countZero(), id: imageId };
    const target: RemoteTarget = { url: "warm-up", addr: { host: LOOPBACK, port }, token, info, zero, deadlineMs: hardMs + 1000, sweep: true };
    const msgs = w.scratch.msgs;

    const stop = (reason?: string) => {
      if (reason !== undefined && result.ok) {
        result.ok = false;
        result.reason = reason;
      }
      loop.stop();
    };
    // Nothing faults on its own here (no thread touches the buffer), but the owner's drain is the same.
    uffdToken = loop.add(uffd, EPOLLIN, () => void vm.drain(), true);
    let faultCursor = PAGES - 1;
    let faultsDue = false;
    let ending = false;
    let retryDue = false;
    const feedFaults = () => {
      faultsDue = false;
      // From the end, while the sweep works from the start: missing pages go urgent, in-flight ones are hurried.
      let n = 0;
      while (n < FAULTS_PER_TURN && faultCursor >= 0) {
        if (!zero.isZero(faultCursor)) writeFaultMessage(msgs, n++, guest.address + faultCursor * IMAGE_PAGE);
        faultCursor -= 3;
      }
      if (n > 0) vm.dispatch(msgs, n);
      decide();
    };
    const startRound = () => {
      faultCursor = PAGES - 1 - (result.rounds % 3);
      client = new VmClient(vm, ctx, target);
      vm.setRequester(client);
      feedFaults();
    };
    const endRound = () => {
      ending = false;
      client!.close();
      result.requests += client!.counters.requests;
      client = undefined;
      // Every byte of the first round is checked (the same code serves the later ones; a 2 MiB compare per round would be most of a round's time).
      if (result.rounds === 0 && Buffer.compare(guest.bytes, source.bytes) !== 0) return stop("the installed bytes differ from the served ones");
      result.rounds++;
      result.pages += PAGES;
      w.discard();
      if (performance.now() - t0 >= budgetMs || result.rounds >= maxRounds) return stop();
      startRound();
    };
    // What the daemon's VmSupervisor.decide() does, for a VM that is never failed or killed.
    const decide = () => {
      if (client === undefined || ending) return;
      if (vm.failure !== undefined) return stop(`${vm.failure.code}: ${vm.failure.detail}`);
      if (vm.retry.length > 0) {
        // One retry timer however often we are told of deliveries meanwhile (as the VM's owner does).
        if (!retryDue) {
          retryDue = true;
          cancels.push(loop.after(1, () => {
            retryDue = false;
            vm.drain();
            decide();
          }));
        }
        return;
      }
      if (w.table.complete) {
        // Not from inside the client's own delivery call.
        if (!ending) {
          ending = true;
          cancels.push(loop.after(0, endRound));
        }
        return;
      }
      if (!faultsDue && faultCursor >= 0) {
        faultsDue = true;
        cancels.push(loop.after(0, feedFaults));
      }
    };
    const ctx: RequesterContext = {
      loop,
      logger: silentLogger,
      fail: (code, detail, context) => vm.fail(code, detail, undefined, context),
      delivered: () => decide(),
    };
    cancels.push(loop.after(hardMs, () => stop(`not done within ${hardMs} ms`)));
    startRound();
    await loop.run();
  } catch (e) {
    result.ok = false;
    result.reason = (e as Error).message;
  } finally {
    for (const c of cancels) c();
    client?.close();
    if (uffdToken >= 0) loop.remove(uffdToken, uffd);
    server?.close();
    w.close();
  }
  result.ms = performance.now() - t0;
  return result;
}

/** The warm-up's line (`daemon.postcopy_warm_up` or `page_server.warm_up`, docs/events.md). */
export function logPostcopyWarmUp(logger: Logger, event: "daemon.postcopy_warm_up" | "page_server.warm_up", r: PostcopyWarmUpResult | undefined): void {
  logger.debug(
    event,
    r === undefined
      ? "postcopy warm-up skipped (no userfaultfd)"
      : `postcopy path warmed up in ${r.ms.toFixed(1)} ms (${r.rounds} rounds, ${r.pages} pages over loopback${r.ok ? "" : `; stopped: ${r.reason}`})`,
    { done: r?.ok === true && r.rounds > 0, ms: r?.ms, rounds: r?.rounds, pages: r?.pages, reason: r?.reason },
  );
}
