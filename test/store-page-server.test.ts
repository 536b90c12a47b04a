// `page-server --mem file://STORE/NAME` fronting a store for a rack: daemons restoring with
// `serve --mem tcp://` get every page verified by the VMM stand-in, the page server fetches each
// chunk once however many clients ask, and a chunk tampered with in the store never reaches a
// client (its request is refused, the VM is killed, one clear line on each side). The same
// against a real Ceph RGW is in store-s3.test.ts.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { cpSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { chunkKey, decodeManifest, encodeChunk, manifestKey } from "../src/sources/store/format.ts";
import { encodeWorkingSet } from "../src/scheduler/working-set.ts";
import { type Daemon, describeRun, ensureBuilt, runSnapload, runStandin, STANDIN, type StandinResult, startDaemon, tempDir } from "./harness.ts";
import { type PageServerProc, startPageServer } from "./postcopy-wire.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;
const SIZE = 32 * MIB;
const T = 60_000;
let dir: ReturnType<typeof tempDir>;
let image: string;
let store: string;
let tokenFile: string;
let n = 0;
const cleanup: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, SIZE, 44);
  store = join(dir.path, "store");
  const p = await runSnapload(["push", image, `file://${store}/vm`, "--chunk-size", "256k"]);
  expect(p.code, p.stderr).toBe(0);
  tokenFile = join(dir.path, "token");
  writeFileSync(tokenFile, "c0ffee-store-page-server-token-5e1f\n", { mode: 0o600 });
});

afterAll(async () => {
  await Promise.all(cleanup.map((c) => c()));
  dir?.cleanup();
}, 15_000);

async function pageServer(mem: string, args: string[] = []): Promise<PageServerProc> {
  const p = await startPageServer(["--mem", mem, "--token-file", tokenFile, "--cache-dir", join(dir.path, `ps-cache-${++n}`), "--log-level", "debug", ...args]);
  cleanup.push(() => p.daemon.stop());
  return p;
}

async function serve(ps: PageServerProc, args: string[] = []): Promise<Daemon> {
  const d = await startDaemon(["--mem", `tcp://127.0.0.1:${ps.port}`, "--token-file", tokenFile, ...args], join(dir.path, `d${++n}.sock`));
  cleanup.push(() => d.stop());
  return d;
}

function expectClean(r: StandinResult, verified = SIZE / PAGE): void {
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe(verified);
}

const manifest = (root: string, name: string) => decodeManifest(readFileSync(join(root, manifestKey(name))), "test");

describe("page-server --mem file://STORE/NAME", () => {
  test("two daemons restore from one page server, every page verified; one GET per chunk for both", async () => {
    const ps = await pageServer(`file://${store}/vm`);
    expect(ps.daemon.log).toMatch(/page server listening on 127\.0\.0\.1:\d+: store file:\/\/.*\/vm \(manifest [0-9a-f]{16}\), \d+ chunks of 256 KiB/);
    const [d1, d2] = await Promise.all([serve(ps), serve(ps)]);
    const [a, b] = await Promise.all([
      runStandin(["--socket", d1.socket, "--expect", image, "--order", "random", "--seed", "3", "--verify", "all"]),
      runStandin(["--socket", d2.socket, "--expect", image, "--order", "random", "--seed", "4", "--threads", "2", "--verify", "all"]),
    ]);
    expectClean(a);
    expectClean(b);
    await Promise.all([d1.stop(), d2.stop()]);
    await ps.daemon.stop();
    const distinct = new Set(manifest(store, "vm").body.chunks.filter((h) => h !== null)).size;
    expect(Number(ps.daemon.log.match(/store file:.*: (\d+) GETs/)![1])).toBe(distinct);
  }, T);

  test("the manifest's working set is fetched from startup, before any client asks", async () => {
    const ws = join(dir.path, "ws.bin");
    const order = Uint32Array.from({ length: 256 }, (_, i) => (i * 97) % (SIZE / PAGE));
    writeFileSync(ws, encodeWorkingSet(order, SIZE));
    const p = await runSnapload(["push", image, `file://${store}/withws`, "--chunk-size", "256k", "--working-set", ws]);
    expect(p.code, p.stderr).toBe(0);
    const ps = await pageServer(`file://${store}/withws`);
    expect(ps.daemon.log).toMatch(/working set of 256 pages fetched first/);
    // No client at all: the chunks still arrive.
    await ps.daemon.waitForLog(/withws: working set's \d+ chunks here in [\d.]+ ms/);
    await ps.daemon.stop();
    const m = manifest(store, "withws");
    const wsChunks = new Set([...order].map((pg) => m.body.chunks[Math.floor((pg * PAGE) / m.body.chunkSize)]).filter((h) => h !== null));
    expect(Number(ps.daemon.log.match(/store file:.*: (\d+) GETs/)![1])).toBe(wsChunks.size);
  }, T);

  test("a chunk tampered with in the store: no client gets a page of it; that VM is killed with the reason, others restore", async () => {
    const bad = join(dir.path, "badstore");
    cpSync(store, bad, { recursive: true });
    const victim = manifest(store, "vm").body.chunks[5]!;
    // A well-formed chunk object of other bytes: only the hash check can catch it.
    writeFileSync(join(bad, chunkKey(victim)), encodeChunk(new Uint8Array(256 * 1024).fill(0x5a), 3).object);
    const ps = await pageServer(`file://${bad}/vm`, ["--store-deadline", "2000"]);
    const d = await serve(ps, ["--page-server-deadline", "5000"]);
    const doomed = Bun.spawn([STANDIN, "--socket", d.socket, "--expect", image, "--region", `256k@${5 * 256}k`, "--order", "seq"], { stdout: "pipe", stderr: "pipe" });
    await doomed.exited;
    expect(doomed.signalCode).toBe("SIGKILL");
    await d.waitForLog(/killed the VMM/);
    await ps.daemon.waitForLog(/request \d+: image bytes at 0x[0-9a-f]+ cannot be had/);
    expect(ps.daemon.log).toMatch(/warn: client #\d+ \(urgent\): request \d+: image bytes at 0x1[4-7][0-9a-f]{4} cannot be had: chunk 5 of "vm": chunk [0-9a-f]{16}… from file:\/\/.*: content hashes to [0-9a-f]{16}…: corrupt, not installed \(3 fetches in a row\); request refused/);
    expect(d.log).toMatch(/refused image bytes \[0x[0-9a-f]+, \+\d+\): unavailable: image bytes at 0x1[4-7][0-9a-f]{4}: chunk 5 of "vm": .*content hashes to .*corrupt, not installed.*killed the VMM/);
    // Another VM of the same daemon, and a VM of another daemon, touching other chunks: unaffected.
    expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--region", "1m@0", "--region", "8m@16m", "--verify", "all"]), (9 * MIB) / PAGE);
    const d2 = await serve(ps);
    expectClean(await runStandin(["--socket", d2.socket, "--expect", image, "--region", "4m@8m", "--order", "random", "--verify", "all"]), (4 * MIB) / PAGE);
  }, T);

  test("a store that is not there: the page server refuses to start with one clear line", async () => {
    const r = await runSnapload(["page-server", "--listen", "127.0.0.1:0", "--mem", `file://${store}/nosuch`, "--token-file", tokenFile, "--cache-dir", join(dir.path, "c-x")]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/snapload: file:\/\/.*: no snapshot named "nosuch" \(no object snapshots\/nosuch\)/);
  });
});
