// The QMP client's events (src/sinks/qemu/qmp.ts) against a scripted QMP peer on a real unix
// socket: the event ordering cases a real QEMU cannot be made to produce on demand (an event
// before the wait, an old event a mark must skip, a wait that times out, QEMU going away).
// The real QEMU's MIGRATION events are exercised by qemu-restore.test.ts (waitMigration).
import { afterAll, describe, expect, test } from "bun:test";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { MAX_QMP_LINE, QmpClient, QmpError } from "../src/sinks/qemu/qmp.ts";
import { tempDir } from "./harness.ts";

const tmp = tempDir("snapload-qmp-events-");
afterAll(() => tmp.cleanup());

/** A QMP peer: greets, answers every command with `{return: {}}`; `peer` sends what a test scripts. */
async function qmpPeer(name: string): Promise<{ path: string; server: Server; peer: Promise<Socket> }> {
  const path = join(tmp.path, name);
  let gotPeer: (s: Socket) => void = () => {};
  const peer = new Promise<Socket>((r) => (gotPeer = r));
  const server = createServer((s) => {
    s.write(`${JSON.stringify({ QMP: { version: {}, capabilities: [] } })}\n`);
    let buf = "";
    s.on("data", (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        buf = buf.slice(nl + 1);
        s.write(`${JSON.stringify({ return: {} })}\n`);
      }
    });
    gotPeer(s);
  });
  await new Promise<void>((r) => server.listen(path, r));
  return { path, server, peer };
}

const event = (name: string, data: Record<string, unknown> = {}) => `${JSON.stringify({ event: name, data, timestamp: { seconds: 0, microseconds: 0 } })}\n`;

describe("QMP events", () => {
  test("an event that arrived before the wait began is found; a mark skips older ones", async () => {
    const { path, server, peer } = await qmpPeer("a.qmp");
    const q = await QmpClient.connect(path);
    try {
      const s = await peer;
      s.write(event("MIGRATION", { status: "active" }) + event("MIGRATION", { status: "completed" }));
      await q.execute("query-status"); // answered after the events: both are in the buffer now
      const e = await q.waitEvent("MIGRATION", (d) => d.status === "completed", 1000);
      expect(e.data).toEqual({ status: "completed" });
      const mark = q.eventMark;
      expect(mark).toBe(2);
      const later = q.waitEvent("MIGRATION", (d) => d.status === "completed", 1000, mark);
      s.write(event("RESUME") + event("MIGRATION", { status: "completed" }));
      expect((await later).seq).toBe(3);
    } finally {
      q.close();
      server.close();
    }
  });

  test("on() replays the buffered events from a mark, then delivers new ones in order", async () => {
    const { path, server, peer } = await qmpPeer("b.qmp");
    const q = await QmpClient.connect(path);
    try {
      const s = await peer;
      s.write(event("STOP"));
      await q.execute("query-status");
      const mark = q.eventMark;
      s.write(event("RESUME"));
      await q.execute("query-status");
      const seen: string[] = [];
      const off = q.on((e) => seen.push(e.event), mark);
      expect(seen).toEqual(["RESUME"]);
      s.write(event("MIGRATION", { status: "postcopy-active" }));
      await q.execute("query-status");
      off();
      s.write(event("SHUTDOWN"));
      await q.execute("query-status");
      expect(seen).toEqual(["RESUME", "MIGRATION"]);
    } finally {
      q.close();
      server.close();
    }
  });

  test("a wait times out with a QmpError that says so, and rejects when QEMU goes away", async () => {
    const { path, server, peer } = await qmpPeer("c.qmp");
    const q = await QmpClient.connect(path);
    try {
      const err = await q.waitEvent("RESUME", undefined, 50).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(QmpError);
      expect((err as QmpError).context.timedOut).toBe(true);
      expect((err as QmpError).message).toContain("no RESUME event within 50 ms");
      const waiting = q.waitEvent("RESUME", undefined, 10_000).catch((e: unknown) => e);
      const lost = q.lost();
      (await peer).destroy();
      const gone = await waiting;
      expect(gone).toBeInstanceOf(QmpError);
      expect((gone as QmpError).message).toContain("did QEMU exit?");
      expect(await lost).toBe(gone as Error);
    } finally {
      q.close();
      server.close();
    }
  });

  test("close() ends a wait at once (closed), not at its timeout", async () => {
    const { path, server } = await qmpPeer("d.qmp");
    const q = await QmpClient.connect(path);
    try {
      const t0 = performance.now();
      const waiting = q.waitEvent("RESUME", undefined, 10_000).catch((e: unknown) => e);
      q.close();
      const err = await waiting;
      expect(err).toBeInstanceOf(QmpError);
      expect((err as QmpError).message).toContain("closed");
      expect((err as QmpError).context.timedOut).toBeUndefined();
      expect(performance.now() - t0).toBeLessThan(5000);
    } finally {
      q.close();
      server.close();
    }
  });

  test("a peer that never ends its line is dropped once the line passes MAX_QMP_LINE, not buffered on", async () => {
    const { path, server, peer } = await qmpPeer("e.qmp");
    const q = await QmpClient.connect(path);
    try {
      const s = await peer;
      const wait = q.waitEvent("MIGRATION", () => true, 30_000);
      const closed = new Promise<void>((r) => s.on("close", () => r()));
      s.write("x".repeat(MAX_QMP_LINE + 1));
      const err = await wait.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(QmpError);
      expect((err as Error).message).toContain(`longer than ${MAX_QMP_LINE} bytes without a newline`);
      await closed; // the client hung up on it
    } finally {
      q.close();
      server.close();
    }
  });
});
