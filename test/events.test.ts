// Structured events (src/core/log.ts): with --log-format json every line the daemons write is one JSON
// event with a known name; the fields agree with what the VMM stand-in saw; docs/events.md names
// exactly the events the code can emit.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { EVENT_NAMES, Logger, type LogRecord } from "../src/core/log.ts";
import { type Daemon, describeRun, ensureBuilt, REFUSED, ROOT, runHostilePeer, runStandin, startDaemon, tempDir } from "./harness.ts";
import { startPageServer } from "./postcopy-wire.ts";

const MIB = 1024 * 1024;
const PAGES = (16 * MIB) / 4096;
let dir: ReturnType<typeof tempDir>;
let image: string;

beforeAll(() => {
  ensureBuilt();
  dir = tempDir("snapload-events-");
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 16 * MIB, 5);
});
afterAll(() => dir?.cleanup());

/** Every line of the daemon's stderr is a JSON event with the envelope and a known name. */
function expectOnlyEvents(d: Daemon): LogRecord[] {
  const lines = d.log.split("\n").filter((l) => l !== "");
  expect(lines.length).toBeGreaterThan(0);
  const known = new Set<string>(EVENT_NAMES);
  return lines.map((line) => {
    const e = JSON.parse(line) as LogRecord;
    expect(known.has(e.event), `unknown event in ${line}`).toBe(true);
    expect(["error", "warn", "info", "debug"]).toContain(e.level);
    expect(Number.isNaN(Date.parse(e.ts))).toBe(false);
    expect(typeof e.msg).toBe("string");
    return e;
  });
}

describe("Logger", () => {
  test("json: the envelope, then the fields; a field cannot overwrite the envelope", () => {
    const lines: string[] = [];
    const log = new Logger("info", { format: "json", sink: (l) => lines.push(l) });
    log.info("vm.exited", "vm 3 exited", { vm: 3, event: "forged", level: "error", faults: 7 });
    log.debug("vm.connected", "below the level", { vm: 3 });
    expect(lines.length).toBe(1);
    const e = JSON.parse(lines[0]!);
    expect(Object.keys(e).slice(0, 3)).toEqual(["ts", "level", "event"]);
    expect(e).toMatchObject({ level: "info", event: "vm.exited", msg: "vm 3 exited", vm: 3, faults: 7 });
  });

  test("text: the sentence for people, without the fields", () => {
    const lines: string[] = [];
    new Logger("debug", { sink: (l) => lines.push(l) }).warn("peer.rejected", "connection from pid 9 rejected: no regions", { pid: 9 });
    expect(lines).toEqual([expect.stringMatching(/^snapload \S+Z warn: connection from pid 9 rejected: no regions$/)]);
  });
});

describe("serve --log-format json", () => {
  test("a restore: connected and exited events carry the stand-in's pid, pages and faults", async () => {
    const sock = join(dir.path, "json.sock");
    const d = await startDaemon(["--mem", image, "--fault-around", "1", "--log-format", "json", "--log-level", "debug"], sock);
    try {
      const listening = await d.waitForEvent("daemon.listening");
      expect(listening).toMatchObject({ socket: sock, mem: image, size: 16 * MIB, faultAround: 1, populate: "none" });
      const r = await runStandin(["--socket", sock, "--expect", image, "--order", "random", "--fraction", "0.25"]);
      expect(r.code, describeRun(r)).toBe(0);
      const exited = await d.waitForEvent("vm.exited");
      const connected = await d.waitForEvent("vm.connected");
      expect(connected).toMatchObject({ vm: exited.vm, pid: exited.pid, regions: 1, bytes: 16 * MIB, pageSizes: [4096] });
      // One page per fault: the guest's first touches are exactly the faults and the pages.
      expect(exited.pages).toBe(r.report!.pages);
      expect(exited.faults).toBe(r.report!.pages);
      expect(exited.reason).toBe("VMM hung up");
      await d.stop();
      const events = expectOnlyEvents(d);
      expect(events.map((e) => e.event)).toEqual(expect.arrayContaining(["daemon.warm_up", "daemon.listening", "vm.connected", "vm.exited", "daemon.signal"]));
    } finally {
      await d.stop();
    }
  });

  test("a refused peer is a peer.rejected event with the error's code", async () => {
    const sock = join(dir.path, "reject.sock");
    const d = await startDaemon(["--mem", image, "--log-format", "json"], sock);
    try {
      const r = await runHostilePeer(["--socket", sock, "--region", "32m@0"]);
      expect(r.code, describeRun(r)).toBe(REFUSED);
      const e = await d.waitForEvent("peer.rejected");
      expect(e).toMatchObject({ level: "warn", code: "REGION_OUT_OF_IMAGE" });
      expect(e.pid).toBeGreaterThan(0);
    } finally {
      await d.stop();
    }
    expectOnlyEvents(d);
  });
});

describe("page-server --log-format json", () => {
  test("listening, a client authenticated and closed, all as events", async () => {
    const token = join(dir.path, "token");
    writeFileSync(token, "a-test-secret-of-enough-bytes-0123456789", { mode: 0o600 });
    const ps = await startPageServer(["--mem", image, "--token-file", token, "--log-format", "json", "--log-level", "debug"]);
    const sock = join(dir.path, "remote.sock");
    const d = await startDaemon(["--mem", `tcp://127.0.0.1:${ps.port}`, "--token-file", token, "--log-format", "json"], sock);
    try {
      const listening = await ps.daemon.waitForEvent("page_server.listening");
      expect(listening).toMatchObject({ port: ps.port, format: "raw", path: image, size: 16 * MIB });
      const r = await runStandin(["--socket", sock, "--expect", image, "--order", "random", "--verify", "all"]);
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.report!.verified).toBe(PAGES);
      const detached = await d.waitForEvent("vm.detached");
      expect(detached.faults as number).toBeGreaterThanOrEqual(0);
      await ps.daemon.waitForEvent("page_server.client_authenticated");
    } finally {
      await d.stop();
      await ps.daemon.stop();
    }
    expectOnlyEvents(d);
    const closed = expectOnlyEvents(ps.daemon).filter((e) => e.event === "page_server.client_closed");
    expect(closed.length).toBeGreaterThan(0);
    expect(closed.reduce((n, e) => n + (e.bytes as number), 0)).toBeGreaterThan(0);
  }, 30_000);
});

test("docs/events.md lists exactly the events the code names", () => {
  const doc = readFileSync(join(ROOT, "docs/events.md"), "utf8");
  const documented = [...doc.matchAll(/^\| `([a-z_]+\.[a-z_]+)` \|/gm)].map((m) => m[1]);
  expect(documented.sort()).toEqual([...EVENT_NAMES].sort());
});
