// s3:// against a real Ceph RADOS Gateway on loopback (started once for this file): push with
// dedup, pull, inspect, lazy restores verified page by page, wrong credentials, and the gateway
// going down mid-restore (and coming back, or not).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { chunkKey, decodeManifest, encodeChunk } from "../src/sources/store/format.ts";
import { encodeWorkingSet } from "../src/scheduler/working-set.ts";
import { startPageServer } from "./postcopy-wire.ts";
import { cephMissing, createBucket, type Rgw, startRgw } from "./ceph-rgw.ts";
import { ErrorCode } from "../src/postcopy/protocol.ts";
import { type Daemon, describeRun, ensureBuilt, patchFile, runSnapload, runStandin, STANDIN, type StandinResult, startDaemon, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;
const SIZE = 32 * MIB;
const T = 90_000;
let dir: ReturnType<typeof tempDir>;
let image: string;
let rgw: Rgw;
let env: Record<string, string>;
let sockets = 0;

beforeAll(async () => {
  // In CI these must run: a machine without Ceph fails here, saying how to install it.
  const missing = cephMissing();
  if (missing !== undefined) throw new Error(missing);
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, SIZE, 33);
  rgw = await startRgw();
  createBucket(rgw, "snaps");
  env = { ...(process.env as Record<string, string>), ...rgw.env };
}, 120_000);

afterAll(async () => {
  await rgw?.stop();
  dir?.cleanup();
});

const s3 = (name: string) => `s3://snaps/fleet/${name}`;
const ep = () => ["--s3-endpoint", rgw.endpoint];

/** The store's counters, logged once when the (stopped) daemon or page server closed it. */
function storeClosed(d: Daemon) {
  const all = d.events().filter((e) => e.event === "store.closed");
  expect(all.length, d.log).toBe(1);
  return all[0]!;
}

function expectClean(r: StandinResult, verified = SIZE / PAGE): void {
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe(verified);
}

async function serve(name: string, cache: string, extra: string[] = []) {
  return startDaemon(["--mem", s3(name), ...ep(), "--cache-dir", cache, "--log-level", "debug", "--log-format", "json", ...extra], join(dir.path, `s${++sockets}.sock`), rgw.env);
}

describe("push, pull, inspect against Ceph RGW", () => {
  test("push uploads every chunk once; a near-identical second snapshot uploads only what changed; pull is byte-identical", async () => {
    const p1 = await runSnapload(["push", image, s3("vm1"), ...ep(), "--chunk-size", "256k"], { env });
    expect(p1.code, p1.stderr).toBe(0);
    expect(p1.stdout).toMatch(/uploaded 128 of 128 data chunks/);
    const second = join(dir.path, "vm2.mem");
    copyFileSync(image, second);
    patchFile(second, 3 * MIB + 17, [0xde, 0xad]);
    const p2 = await runSnapload(["push", second, s3("vm2"), ...ep(), "--chunk-size", "256k"], { env });
    expect(p2.code, p2.stderr).toBe(0);
    expect(p2.stdout).toMatch(/127 already in the store\); uploaded 1 of 128 data chunks/);
    const out = join(dir.path, "pulled.mem");
    const pl = await runSnapload(["pull", s3("vm2"), out, ...ep()], { env });
    expect(pl.code, pl.stderr).toBe(0);
    expect(Bun.hash(readFileSync(out))).toBe(Bun.hash(readFileSync(second)));
    const ins = await runSnapload(["inspect", s3("vm1"), ...ep(), "--json"], { env });
    expect(ins.code, ins.stderr).toBe(0);
    expect(JSON.parse(ins.stdout)).toMatchObject({ size: SIZE, chunkSize: 256 * 1024, distinctChunks: 128, source: "raw" });
  }, T);

  test("wrong credentials: one clear line, exit 2", async () => {
    const r = await runSnapload(["inspect", s3("vm1"), ...ep()], { env: { ...env, AWS_SECRET_ACCESS_KEY: "wrong" } });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^snapload: s3:\/\/snaps\/fleet: GET snapshots\/vm1: SignatureDoesNotMatch/);
  });
});

describe("serve --mem s3://", () => {
  test("lazy restores, two VMs at once, every page verified", async () => {
    const d = await serve("vm1", join(dir.path, "cache-a"));
    try {
      const [a, b] = await Promise.all([
        runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--seed", "5", "--verify", "all"]),
        runStandin(["--socket", d.socket, "--expect", image, "--order", "seq", "--threads", "2", "--verify", "all"]),
      ]);
      expectClean(a);
      expectClean(b);
    } finally {
      await d.stop();
    }
    expect(storeClosed(d)).toMatchObject({ ref: s3("vm1"), gets: 128 });
  }, T);

  test("the gateway goes down mid-restore and comes back: the restore completes, no wrong page", async () => {
    const d = await serve("vm1", join(dir.path, "cache-b"), ["--page-server-deadline", "30000"]);
    try {
      await rgw.stopGateway();
      const run = runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--verify", "all"]);
      await d.waitForEvent("store.get_retrying", (e) => e.deadlineMs === 30_000);
      await rgw.startGateway();
      expectClean(await run);
      expect(d.events().filter((e) => e.event === "vm.failed")).toEqual([]);
    } finally {
      await rgw.startGateway();
      await d.stop();
    }
  }, T);

  test("the gateway hangs (SIGSTOP): GETs are abandoned, the VM is killed by the deadline, not left waiting", async () => {
    const d = await serve("vm1", join(dir.path, "cache-d"), ["--page-server-deadline", "1500"]);
    try {
      rgw.freezeGateway(true);
      const doomed = Bun.spawn([STANDIN, "--socket", d.socket, "--expect", image, "--order", "random", "--timeout", "20000"], { stdout: "pipe", stderr: "pipe" });
      await doomed.exited;
      expect(doomed.signalCode).toBe("SIGKILL");
      // Not obtainable within the deadline, and GETs went unanswered (abandoned, not failed fast).
      const failed = await d.waitForEvent("vm.failed");
      expect(failed).toMatchObject({ code: "STORE_UNAVAILABLE", action: "killed", ref: s3("vm1"), url: "s3://snaps/fleet", deadlineMs: 1500 });
      expect(failed.key).toMatch(/^chunks\/[0-9a-f]{2}\/[0-9a-f]{64}$/);
      expect(failed.timeouts).toBeGreaterThanOrEqual(1);
    } finally {
      rgw.freezeGateway(false);
      await d.stop();
    }
  }, T);

  test("the gateway never comes back: the VM is killed after the deadline, with the reason", async () => {
    const d = await serve("vm1", join(dir.path, "cache-c"), ["--page-server-deadline", "1500"]);
    try {
      await rgw.stopGateway();
      const doomed = Bun.spawn([STANDIN, "--socket", d.socket, "--expect", image, "--order", "random", "--timeout", "20000"], { stdout: "pipe", stderr: "pipe" });
      await doomed.exited;
      expect(doomed.signalCode).toBe("SIGKILL");
      const failed = await d.waitForEvent("vm.failed");
      expect(failed).toMatchObject({ code: "STORE_UNAVAILABLE", action: "killed", ref: s3("vm1"), url: "s3://snaps/fleet", deadlineMs: 1500 });
      expect(failed.attempts).toBeGreaterThanOrEqual(1);
    } finally {
      await rgw.startGateway();
      await d.stop();
    }
  }, T);
});

describe("multipart uploads", () => {
  test("an object above --part-size goes up in parts (a manifest of ~6.5 MiB: a long working set), and reads back whole", async () => {
    // 1.2 M working-set entries (pages repeat): 4.8 MB of u32s, base64 in the manifest.
    const order = Uint32Array.from({ length: 1_200_000 }, (_, i) => (i * 7919) % (SIZE / PAGE));
    const ws = join(dir.path, "long-ws.bin");
    writeFileSync(ws, encodeWorkingSet(order, SIZE));
    const p = await runSnapload(["push", image, s3("big-manifest"), ...ep(), "--working-set", ws, "--part-size", "5m"], { env });
    expect(p.code, p.stderr).toBe(0);
    const st = await bucket().stat("fleet/snapshots/big-manifest");
    expect(st.size).toBeGreaterThan(5 * MIB * 1.2);
    // A multipart object's ETag is "<md5 of the parts' md5s>-<parts>".
    expect(st.etag).toMatch(/-2"?$/);
    const ins = await runSnapload(["inspect", s3("big-manifest"), ...ep(), "--json"], { env });
    expect(ins.code, ins.stderr).toBe(0);
    expect(JSON.parse(ins.stdout).workingSetPages).toBe(1_200_000);
    // Below the part size: one PUT (no part count in the ETag).
    expect((await bucket().stat("fleet/snapshots/vm1")).etag).not.toMatch(/-\d+"?$/);
  }, T);

  test("a part size below S3's minimum is refused before anything is uploaded", async () => {
    const r = await runSnapload(["push", image, s3("tiny-parts"), ...ep(), "--part-size", "1m"], { env });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--part-size.*must be at least 5m/);
  });
});

describe("page-server --mem s3:// (one page server fronts the store for a rack)", () => {
  test("clients restore with every page verified; a chunk tampered with in the bucket never reaches a client", async () => {
    // Its own image: the tampered chunk must not be one other tests' snapshots share.
    const own = join(dir.path, "ps.mem");
    writeDemoImage(own, SIZE, 77);
    const p = await runSnapload(["push", own, s3("psvm"), ...ep(), "--chunk-size", "256k"], { env });
    expect(p.code, p.stderr).toBe(0);
    const token = join(dir.path, "ps-token");
    writeFileSync(token, "rack-page-server-token-0a9f3\n", { mode: 0o600 });
    const ps = await startPageServer(["--mem", s3("psvm"), ...ep(), "--token-file", token, "--cache-dir", join(dir.path, "ps-cache"), "--store-deadline", "3000", "--log-format", "json"], 0, [], rgw.env);
    const d = await startDaemon(["--mem", `tcp://127.0.0.1:${ps.port}`, "--token-file", token, "--page-server-deadline", "8000", "--log-format", "json"], join(dir.path, `s${++sockets}.sock`));
    try {
      expect(ps.daemon.events().find((e) => e.event === "page_server.listening")).toMatchObject({ format: "store", path: s3("psvm"), chunkSize: 256 * 1024 });
      expect(ps.daemon.events().find((e) => e.event === "page_server.listening")!.manifest).toMatch(/^[0-9a-f]{64}$/);
      // Chunk 9 is replaced in the bucket (before anyone fetched it) by a well-formed chunk of other bytes.
      const manifestBytes = await bucket().file("fleet/snapshots/psvm").bytes();
      const victim = decodeManifest(manifestBytes, "test").body.chunks[9]!;
      await bucket().write(`fleet/${chunkKey(victim)}`, encodeChunk(new Uint8Array(256 * 1024).fill(0x77), 3).object);
      const doomed = Bun.spawn([STANDIN, "--socket", d.socket, "--expect", own, "--region", `256k@${9 * 256}k`, "--order", "seq"], { stdout: "pipe", stderr: "pipe" });
      await doomed.exited;
      expect(doomed.signalCode).toBe("SIGKILL");
      const inChunk9 = (at: unknown) => typeof at === "number" && at >= 9 * 256 * 1024 && at < 10 * 256 * 1024;
      // The page server: chunk 9 decoded but hashed to other bytes, 3 fetches in a row; the request refused.
      const refused = await ps.daemon.waitForEvent("page_server.bytes_unavailable");
      expect(refused).toMatchObject({ code: "BAD_CHUNK", ref: s3("psvm"), chunkIndex: 9, hash: victim, key: chunkKey(victim), url: "s3://snaps/fleet", fetches: 3 });
      expect(refused.contentHash).toMatch(/^[0-9a-f]{64}$/);
      expect(refused.contentHash).not.toBe(victim);
      expect(inChunk9(refused.at), `at ${refused.at}`).toBe(true);
      // The daemon: its request for chunk 9's bytes refused as unavailable; the VM killed.
      const failed = await d.waitForEvent("vm.failed");
      expect(failed).toMatchObject({ code: "BAD_FRAME", action: "killed", url: `tcp://127.0.0.1:${ps.port}`, wireCode: ErrorCode.UNAVAILABLE });
      expect(inChunk9(failed.start), `start ${failed.start}`).toBe(true);
      // Two VMs of the rack, every page but chunk 9's, verified.
      const around = ["--region", `${9 * 256}k@0`, "--region", `${SIZE / 1024 - 10 * 256}k@${10 * 256}k`];
      const [a, b] = await Promise.all([
        runStandin(["--socket", d.socket, "--expect", own, ...around, "--order", "random", "--seed", "7", "--verify", "all"]),
        runStandin(["--socket", d.socket, "--expect", own, ...around, "--order", "seq", "--threads", "2", "--verify", "all"]),
      ]);
      expectClean(a, SIZE / PAGE - 64);
      expectClean(b, SIZE / PAGE - 64);
    } finally {
      await d.stop();
      await ps.daemon.stop();
    }
    // One GET per good chunk however many clients asked (chunk 9's fetches all came back corrupt).
    const distinct = new Set(decodeManifest(await bucket().file("fleet/snapshots/psvm").bytes(), "test").body.chunks.filter((h) => h !== null)).size;
    const closed = storeClosed(ps.daemon);
    expect(Number(closed.gets) - Number(closed.badFetches)).toBe(distinct - 1);
    expect(closed.badFetches).toBeGreaterThanOrEqual(3);
  }, T);
});

function bucket(): Bun.S3Client {
  return new Bun.S3Client({ bucket: "snaps", endpoint: rgw.endpoint, accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey, region: "us-east-1" });
}
