// End to end: `snapload page-server` → `snapload serve --mem tcp://…` → the C VMM stand-in,
// every page verified against the image. The page server is killed, restarted, never comes
// back, lies (corrupted replies), or is approached with the wrong token.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { generateMappedRam, type GeneratedBlock } from "./gen-mapped-ram.ts";
import { type Daemon, describeRun, ensureBuilt, runSnapload, REFUSED, runHostilePeer, runStandin, STANDIN, startDaemon, type StandinResult, tempDir } from "./harness.ts";
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
  const p = await startPageServer(["--mem", mem, "--token-file", tokenFile, ...args], port, faults);
  cleanup.push(() => p.daemon.stop());
  return p;
}

let sockets = 0;
async function serve(url: string, args: string[] = []): Promise<Daemon> {
  const d = await startDaemon(["--mem", url, "--token-file", tokenFile, "--handshake-timeout", "3000", ...args], join(dir.path, `d${++sockets}.sock`));
  cleanup.push(() => d.stop());
  return d;
}

const url = (p: PageServerProc) => `tcp://127.0.0.1:${p.port}`;

function expectClean(r: StandinResult, verified = PAGES): void {
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe(verified);
}

/** Faults of the daemon's most recent VM exit line. */
function lastExitFaults(log: string): number {
  const m = [...log.matchAll(/pages served \(\d+ zero\) in (\d+) faults/g)].at(-1);
  if (!m) throw new Error(`no exit line in log:\n${log}`);
  return Number(m[1]);
}

describe("restores from a page server, every page verified", () => {
  let d: Daemon;
  beforeAll(async () => {
    d = await serve(url(server));
  });

  test("random order, two vCPUs; then the VM is fully populated and detached", async () => {
    expect(d.log).toMatch(/listening on .*: page server tcp:\/\/127\.0\.0\.1:\d+, 50331648 bytes \(\d+ data, \d+ zero pages\)/);
    const r = await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r);
    await d.waitForLog(/vm 1 pid \d+ fully populated in [\d.]+ s .*; detached/);
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
    await d.waitForLog(/rejected: .*no regions/);
    expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--region", "4m@0", "--verify", "all"]), (4 * MIB) / PAGE);
  }, T);

  test("a VM that touches 1% is pulled whole in the background, then detached: few faults", async () => {
    const r = await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--fraction", "0.01", "--pause", "2000", "--verify", "all"]);
    expectClean(r);
    await d.waitForLog(/exited \(VMM hung up\)[^\n]*\n(?![\s\S]*exited \(VMM hung up\))/);
    const faults = lastExitFaults(d.log);
    expect(faults).toBeGreaterThan(0);
    expect(faults).toBeLessThan(PAGES / 20);
    const vm = [...d.log.matchAll(/vm (\d+) pid \d+ connected/g)].at(-1)![1];
    expect(d.log).toMatch(new RegExp(`vm ${vm} pid \\d+ fully populated in [\\d.]+ s \\(\\d+ faults, \\d+ prefetched, \\d+ populated pages\\); detached`));
  }, T);

  test("--populate none: pages come only when faulted, and the VM is never detached", async () => {
    const od = await serve(url(server), ["--populate", "none", "--fault-around", "1"]);
    expect(od.log).toContain("on demand only (--populate none)");
    const r = await runStandin(["--socket", od.socket, "--expect", image, "--order", "random", "--fraction", "0.05", "--pause", "1000"]);
    expectClean(r, r.report!.pages);
    await od.waitForLog(/exited \(VMM hung up\)/);
    // Every touched page was one fault and one page served: nothing was pulled ahead of the guest.
    expect(lastExitFaults(od.log)).toBe(r.report!.pages);
    expect(od.log).not.toContain("detached");
  }, T);

  test("a QEMU mapped-ram image (stale bytes behind zero pages never cross the wire)", async () => {
    const mr = await pageServer(["--ramblock", "pc.ram"], 0, mapped.path);
    const md = await serve(url(mr));
    const r = await runStandin(["--socket", md.socket, "--expect", mapped.ram.expectFile!, "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r, mapped.ram.usedLength / PAGE);
  }, T);
});

describe("2 MiB pages (hugetlbfs guests)", () => {
  const NR = "/proc/sys/vm/nr_hugepages";
  let oldNr: number | undefined;
  let why = "";
  beforeAll(() => {
    try {
      const free = () => Number(readFileSync("/proc/meminfo", "utf8").match(/^HugePages_Free:\s+(\d+)/m)?.[1] ?? 0);
      if (free() < 12) {
        oldNr = Number(readFileSync(NR, "utf8").trim());
        writeFileSync(NR, String(oldNr + 12 - free()));
      }
      if (free() < 12) why = `only ${free()} free 2 MiB huge pages`;
    } catch (e) {
      why = `cannot reserve huge pages: ${(e as Error).message}`;
    }
  });
  afterAll(() => {
    if (oldNr !== undefined) writeFileSync(NR, String(oldNr));
  });

  test("a mapped-ram block whose 2 MiB pages mix data and zero 4 KiB pages: the zero ones are filled in, never fetched", async () => {
    if (why) return console.warn(`postcopy.test.ts: skipping the 2 MiB case: ${why}`);
    const mr = await pageServer(["--ramblock", "pc.ram"], 0, mapped.path, ["--corrupt-every", "97"]);
    const md = await serve(url(mr));
    const r = await runStandin(["--socket", md.socket, "--expect", mapped.ram.expectFile!, "--hugepages", "--order", "random", "--threads", "2", "--balloon-after", "4m:2m", "--verify", "all"]);
    expectClean(r, mapped.ram.usedLength / (2 * MIB));
    await md.waitForLog(/vm 1 pid \d+ connected: 1 region, 16 MiB, 2 MiB pages/);
  }, T);
});

describe("when the page server goes away", () => {
  test("killed and restarted on the same port mid-restore: the restore completes, no wrong page", async () => {
    let ps = await pageServer([]);
    const port = ps.port;
    const d = await serve(url(ps), ["--page-server-deadline", "15000"]);
    const run = runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    await d.waitForLog(/vm 1 pid \d+ connected/);
    await Bun.sleep(60); // past the channels' handshake, into the transfer (either way requests are outstanding)
    ps.daemon.proc.kill("SIGKILL");
    await ps.daemon.proc.exited;
    await Bun.sleep(400); // vCPUs wait; the client retries with backoff
    ps = await pageServer([], port);
    const r = await run;
    expectClean(r);
    expect(d.log).toMatch(/vm 1: (lost|cannot reach) the page server tcp:\/\/127\.0\.0\.1:\d+ \(\w+ channel: [^)]*\); \d+ requests to re-send; reconnecting/);
    expect(d.log).toMatch(/vm 1: page server tcp:\/\/127\.0\.0\.1:\d+ is back after \d+ ms; outstanding requests re-sent/);
    await d.waitForLog(/vm 1 pid \d+ fully populated .*detached/);
    expect(d.log).not.toMatch(/killed the VMM/);
  }, T);

  test("never comes back: that VM is killed after the deadline; a VM served from a local file is not", async () => {
    const ps = await pageServer([]);
    const remoteSock = join(dir.path, `remote-${++sockets}.sock`);
    const localSock = join(dir.path, `local-${++sockets}.sock`);
    const d = await startDaemon(
      ["--mem", url(ps), "--socket", localSock, "--mem", image, "--token-file", tokenFile, "--page-server-deadline", "1500"],
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
    await d.waitForLog(/killed the VMM/);
    const lines = d.log.split("\n").filter((l) => /killed the VMM/.test(l));
    expect(lines.length).toBe(1);
    expect(lines[0]).toMatch(/error: vm \d+ pid \d+: no page server at tcp:\/\/127\.0\.0\.1:\d+ for 1500 ms \(last: connect failed: ECONNREFUSED\); \d+ requests unanswered; killed the VMM/);
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
    expect(d.log).toMatch(/error: vm 1: (urgent|background) channel to tcp:\/\/127\.0\.0\.1:\d+: a frame from the page server failed authentication: the payload of frame \d+ \(\d+ bytes\) failed authentication \(changed in transit\); nothing of it installed, connection dropped, \d+ requests to re-send/);
    await d.waitForLog(/vm 1 pid \d+ fully populated .*detached/);
  }, T);

  test("a wrong token is refused, with a clear error on both sides", async () => {
    const r = await runSnapload(["serve", "--socket", join(dir.path, "wrong.sock"), "--mem", url(server), "--token-file", wrongTokenFile]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/snapload: page server tcp:\/\/127\.0\.0\.1:\d+: the page server refused us: authentication failed/);
    await server.daemon.waitForLog(/client #\d+ from 127\.0\.0\.1: authentication failed: the client's proof does not match our token \(is --token-file the same on both sides\?\); connection closed/);
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
