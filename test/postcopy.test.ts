// End to end: `snapload page-server` → `snapload serve --mem tcp://…` → the C VMM stand-in,
// every page verified against the image. The page server is killed, restarted, never comes
// back, lies (corrupted replies), or is approached with the wrong token.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { generateMappedRam, type GeneratedBlock } from "./gen-mapped-ram.ts";
import { parseExposition } from "../src/metrics/exposition.ts";
import { ErrorCode } from "../src/postcopy/protocol.ts";
import {
  type Daemon, describeRun, ensureBuilt, reserveHugePages, runSnapload, REFUSED, runHostilePeer, runStandin, STANDIN, startDaemon, type StandinResult, tempDir,
} from "./harness.ts";
import { type PageServerProc, startPageServer } from "./postcopy-wire.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;
const IMAGE_MIB = 48;
const PAGES = (IMAGE_MIB * MIB) / PAGE;
/** Per test: long enough for a restart and a deadline, short enough to fail fast. */
const T = 30_000;

let dir: ReturnType<typeof tempDir>;
let image: string;
let tokenFile: string;
let wrongTokenFile: string;
let server: PageServerProc;
let mapped: { path: string; ram: GeneratedBlock };
const cleanup: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir("snapload-postcopy-");
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, IMAGE_MIB * MIB, 17);
  tokenFile = join(dir.path, "token");
  writeFileSync(tokenFile, "4f1c2a3e-postcopy-test-token-8d9b\n", { mode: 0o600 });
  wrongTokenFile = join(dir.path, "wrong-token");
  writeFileSync(wrongTokenFile, "not-the-token-everyone-else-uses\n", { mode: 0o600 });
  const gen = generateMappedRam(join(dir.path, "guest.mapped-ram"), { ramMiB: 16, seed: 8 });
  mapped = { path: gen.path, ram: gen.blocks.find((b) => b.name === "pc.ram")! };
  server = await pageServer([]);
}, 30_000);

afterAll(async () => {
  await Promise.all(cleanup.map((c) => c()));
  dir?.cleanup();
}, 15_000);

async function pageServer(args: string[], port = 0, mem = image, faults: string[] = []): Promise<PageServerProc> {
  const p = await startPageServer(["--mem", mem, "--token-file", tokenFile, "--log-format", "json", "--log-level", "debug", ...args], port, faults);
  cleanup.push(() => p.daemon.stop());
  return p;
}

let sockets = 0;
async function serve(url: string, args: string[] = []): Promise<Daemon> {
  const d = await startDaemon(
    ["--mem", url, "--token-file", tokenFile, "--handshake-timeout", "3000", "--log-format", "json", "--log-level", "debug", ...args],
    join(dir.path, `d${++sockets}.sock`),
  );
  cleanup.push(() => d.stop());
  return d;
}

const url = (p: PageServerProc) => `tcp://127.0.0.1:${p.port}`;

function expectClean(r: StandinResult, verified = PAGES): void {
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe(verified);
}

/** Polls `check` every 10 ms until it holds (a condition no event announces). */
async function until(what: string, check: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  for (const deadline = Date.now() + timeoutMs; !(await check()); await Bun.sleep(10)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
  }
}

/** The daemon's most recently connected VM (its number). */
function lastVm(d: Daemon): number {
  const e = d.events().filter((e) => e.event === "vm.connected").at(-1);
  if (!e) throw new Error(`no vm.connected event; log:\n${d.log}`);
  return Number(e.vm);
}

describe("restores from a page server, every page verified", () => {
  let d: Daemon;
  beforeAll(async () => {
    d = await serve(url(server));
  });

  test("random order, two vCPUs; then the VM is fully populated and detached", async () => {
    const listening = await d.waitForEvent("daemon.listening");
    expect(listening).toMatchObject({ format: "page-server", url: url(server), size: IMAGE_MIB * MIB, background: true });
    expect(Number(listening.dataPages) + Number(listening.zeroPages)).toBe(PAGES);
    expect(listening.dataPages).toBeGreaterThan(0);
    const r = await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r);
    const detached = await d.waitForEvent("vm.detached", (e) => e.vm === 1);
    expect(detached.seconds).toBeGreaterThan(0);
  }, T);

  test("two VMs from one page server at once", async () => {
    const runs = await Promise.all([3, 4].map((seed) => runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--seed", String(seed), "--verify", "all"])));
    for (const r of runs) expectClean(r);
  }, T);

  test("what serve promises holds over tcp:// too: wire formats, regions, balloons", async () => {
    const runs = await Promise.all([
      runStandin(["--socket", d.socket, "--expect", image, "--format", "v1", "--region", "8m@16m", "--verify", "all"]),
      runStandin(["--socket", d.socket, "--expect", image, "--format", "future", "--region", "16m@0", "--region", "8m@32m", "--far", "--order", "random", "--verify", "all"]),
      runStandin(["--socket", d.socket, "--expect", image, "--balloon", "0:8m", "--balloon-after", "16m:8m", "--order", "random", "--verify", "all"]),
    ]);
    expectClean(runs[0]!, (8 * MIB) / PAGE);
    expectClean(runs[1]!, (24 * MIB) / PAGE);
    expectClean(runs[2]!);
  }, T);

  test("a bad VMM handshake is refused; the daemon goes on", async () => {
    const bad = await runHostilePeer(["--socket", d.socket, "--body", "[]"]);
    expect(bad.code, describeRun(bad)).toBe(REFUSED);
    await d.waitForEvent("peer.rejected", (e) => e.code === "BAD_HANDSHAKE" && e.socket === d.socket);
    expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--region", "4m@0", "--verify", "all"]), (4 * MIB) / PAGE);
  }, T);

  test("a VM that touches 1% is pulled whole in the background, then detached: few faults", async () => {
    const r = await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--fraction", "0.01", "--pause", "2000", "--verify", "all"]);
    expectClean(r);
    const vm = lastVm(d);
    const exited = await d.waitForEvent("vm.exited", (e) => e.vm === vm);
    expect(exited.reason).toBe("VMM hung up");
    expect(exited.faults).toBeGreaterThan(0);
    expect(exited.faults).toBeLessThan(PAGES / 20);
    // Detached before the VMM hung up: the background pull had completed it.
    const detached = d.events().find((e) => e.event === "vm.detached" && e.vm === vm);
    expect(detached, d.log).toBeDefined();
    expect(Number(detached!.prefetchedPages) + Number(detached!.populatedPages)).toBeGreaterThan(0);
  }, T);

  test("--populate none: pages come only when faulted, and the VM is never detached", async () => {
    const od = await serve(url(server), ["--populate", "none", "--fault-around", "1"]);
    expect(await od.waitForEvent("daemon.listening")).toMatchObject({ format: "page-server", populate: "none", background: false });
    const r = await runStandin(["--socket", od.socket, "--expect", image, "--order", "random", "--fraction", "0.05", "--pause", "1000"]);
    expectClean(r, r.report!.pages);
    const exited = await od.waitForEvent("vm.exited", (e) => e.vm === 1);
    expect(exited.reason).toBe("VMM hung up");
    // Every touched page was one fault and one page served: nothing was pulled ahead of the guest.
    expect(exited.faults).toBe(r.report!.pages);
    expect(exited.pages).toBe(r.report!.pages);
    expect(od.events().filter((e) => e.event === "vm.detached")).toEqual([]);
  }, T);

  test("a QEMU mapped-ram image (stale bytes behind zero pages never cross the wire)", async () => {
    const mr = await pageServer(["--ramblock", "pc.ram"], 0, mapped.path);
    const md = await serve(url(mr));
    const r = await runStandin(["--socket", md.socket, "--expect", mapped.ram.expectFile!, "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r, mapped.ram.usedLength / PAGE);
  }, T);
});

describe("2 MiB pages (hugetlbfs guests)", () => {
  // The 16 MiB guest is 8 huge pages; the rest is headroom.
  const huge = reserveHugePages(12, "postcopy.test.ts");
  afterAll(() => huge.restore());

  test.skipIf(huge.skipReason !== "")("a mapped-ram block whose 2 MiB pages mix data and zero 4 KiB pages: the zero ones are filled in, never fetched (needs 12 free 2 MiB huge pages)", async () => {
    const mr = await pageServer(["--ramblock", "pc.ram"], 0, mapped.path, ["--corrupt-every", "97"]);
    const md = await serve(url(mr));
    const r = await runStandin(["--socket", md.socket, "--expect", mapped.ram.expectFile!, "--hugepages", "--order", "random", "--threads", "2", "--balloon-after", "4m:2m", "--verify", "all"]);
    expectClean(r, mapped.ram.usedLength / (2 * MIB));
    expect(await md.waitForEvent("vm.connected", (e) => e.vm === 1)).toMatchObject({ regions: 1, bytes: 16 * MIB, pageSizes: [2 * MIB] });
  }, T);
});

describe("when the page server goes away", () => {
  test("killed and restarted on the same port mid-restore: the restore completes, no wrong page", async () => {
    let ps = await pageServer(["--metrics", "127.0.0.1:0"]);
    const port = ps.port;
    const metrics = String((await ps.daemon.waitForEvent("metrics.listening")).url);
    const d = await serve(url(ps), ["--page-server-deadline", "15000"]);
    const run = runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    await d.waitForEvent("vm.connected", (e) => e.vm === 1);
    // Into the transfer: the VM's requests reach the page server (its metrics count them).
    await until("the page server counts the VM's first request", async () => {
      const s = parseExposition(await (await fetch(metrics)).text());
      return (s.find((x) => x.name === "snapload_page_server_requests_total")?.value ?? 0) > 0;
    });
    ps.daemon.proc.kill("SIGKILL");
    await ps.daemon.proc.exited;
    // vCPUs wait; the client retries with backoff. Two channel losses after the first means both
    // channels dropped and at least one reconnect attempt found nobody there.
    const lost = await d.waitForEvent("remote.lost", (e) => e.vm === 1);
    await d.waitForEvents("remote.channel_lost", 2, (e) => e.vm === 1);
    ps = await pageServer([], port);
    const r = await run;
    expectClean(r);
    expect(lost).toMatchObject({ url: url(ps), kind: "io", connected: true });
    expect(["urgent", "background"]).toContain(String(lost.channel));
    expect(lost.resend).toBeGreaterThanOrEqual(0);
    const back = await d.waitForEvent("remote.back", (e) => e.vm === 1);
    expect(back.stalledMs).toBeGreaterThan(0);
    await d.waitForEvent("vm.detached", (e) => e.vm === 1);
    expect(d.events().filter((e) => e.event === "vm.failed")).toEqual([]);
  }, T);

  test("never comes back: that VM is killed after the deadline; a VM served from a local file is not", async () => {
    const ps = await pageServer([]);
    const remoteSock = join(dir.path, `remote-${++sockets}.sock`);
    const localSock = join(dir.path, `local-${++sockets}.sock`);
    const d = await startDaemon(
      ["--mem", url(ps), "--socket", localSock, "--mem", image, "--token-file", tokenFile, "--page-server-deadline", "1500", "--log-format", "json"],
      remoteSock,
    );
    cleanup.push(() => d.stop());
    ps.daemon.proc.kill("SIGKILL");
    await ps.daemon.proc.exited;
    const t0 = Date.now();
    // The stand-in is spawned directly: it must die by SIGKILL, which runStandin would not tell us.
    const doomed = Bun.spawn([STANDIN, "--socket", remoteSock, "--expect", image, "--order", "random", "--timeout", "20000"], { stdout: "pipe", stderr: "pipe" });
    const local = await runStandin(["--socket", localSock, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(local);
    await doomed.exited;
    expect(doomed.signalCode).toBe("SIGKILL");
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1400);
    const failed = await d.waitForEvent("vm.failed");
    expect(d.events().filter((e) => e.event === "vm.failed").length).toBe(1);
    expect(failed).toMatchObject({ code: "PEER_GONE", action: "killed", pid: doomed.pid });
    // It never reached the page server: connecting was refused from the first attempt to the deadline.
    expect(d.events().find((e) => e.event === "remote.lost" && e.vm === failed.vm)).toMatchObject({ connected: false, kind: "io", url: url(ps), deadlineMs: 1500 });
    // Still serving: another local VM restores fine.
    expectClean(await runStandin(["--socket", localSock, "--expect", image, "--region", "4m@0", "--verify", "all"]), (4 * MIB) / PAGE);
  }, T);
});

describe("when the page server cannot be trusted", () => {
  test("replies changed on the way fail authentication: never installed, connection dropped, re-requested", async () => {
    const ps = await pageServer([], 0, image, ["--corrupt-every", "50"]);
    const d = await serve(url(ps));
    const r = await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r);
    const tampered = d.events().filter((e) => e.event === "remote.tampered");
    expect(tampered.length, d.log).toBeGreaterThan(0);
    for (const e of tampered) {
      expect(e).toMatchObject({ vm: 1, url: url(ps) });
      expect(["urgent", "background"]).toContain(String(e.channel));
      expect(e.resend).toBeGreaterThanOrEqual(0);
    }
    await d.waitForEvent("vm.detached", (e) => e.vm === 1);
    expect(d.events().filter((e) => e.event === "vm.failed")).toEqual([]);
  }, T);

  test("a wrong token is refused, with a clear error on both sides", async () => {
    const r = await runSnapload(["serve", "--socket", join(dir.path, "wrong.sock"), "--mem", url(server), "--token-file", wrongTokenFile]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/snapload: page server tcp:\/\/127\.0\.0\.1:\d+: the page server refused us: authentication failed/);
    const refused = await server.daemon.waitForEvent("page_server.client_refused", (e) => e.code === ErrorCode.AUTH_FAILED);
    expect(refused.peer).toStartWith("127.0.0.1");
  }, T);

  test("a page server needs a token, and so does a tcp:// client", async () => {
    const a = await runSnapload(["page-server", "--listen", "127.0.0.1:0", "--mem", image]);
    expect(a.code).toBe(2);
    expect(a.stderr).toMatch(/--token-file: is required/);
    const b = await runSnapload(["serve", "--socket", join(dir.path, "nt.sock"), "--mem", url(server)]);
    expect(b.code).toBe(2);
    expect(b.stderr).toMatch(/needs --token-file/);
  }, T);
});
