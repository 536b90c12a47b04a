// `page-server --mem file://STORE/NAME` fronting a store for a rack: daemons restoring with
// `serve --mem tcp://` get every page verified by the VMM stand-in, the page server fetches each
// chunk once however many clients ask, and a chunk tampered with in the store never reaches a
// client (its request is refused, the VM is killed, one clear line on each side). The same
// against a real Ceph RGW is in store-s3.test.ts.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { cpSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chunkKey, decodeManifest, encodeChunk, manifestKey } from "../src/sources/store/format.ts";
import { encodeWorkingSet } from "../src/scheduler/working-set.ts";
import { ErrorCode } from "../src/postcopy/protocol.ts";
import { type Daemon, describeRun, ensureBuilt, runSnapload, runStandin, STANDIN, type StandinResult, pushDemoImage, startDaemon, tempDir } from "./harness.ts";
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
  ({ image, store } = await pushDemoImage(dir.path, SIZE, 44, ["--chunk-size", "256k"]));
  tokenFile = join(dir.path, "token");
  writeFileSync(tokenFile, "c0ffee-store-page-server-token-5e1f\n", { mode: 0o600 });
});

afterAll(async () => {
  await Promise.all(cleanup.map((c) => c()));
  dir?.cleanup();
}, 15_000);

async function pageServer(mem: string, args: string[] = []): Promise<PageServerProc> {
  const p = await startPageServer(["--mem", mem, "--token-file", tokenFile, "--cache-dir", join(dir.path, `ps-cache-${++n}`), "--log-level", "debug", "--log-format", "json", ...args]);
  cleanup.push(() => p.daemon.stop());
  return p;
}

async function serve(ps: PageServerProc, args: string[] = []): Promise<Daemon> {
  const d = await startDaemon(["--mem", `tcp://127.0.0.1:${ps.port}`, "--token-file", tokenFile, "--log-format", "json", ...args], join(dir.path, `d${++n}.sock`));
  cleanup.push(() => d.stop());
  return d;
}

function expectClean(r: StandinResult, verified = SIZE / PAGE): void {
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe(verified);
}

const manifest = (root: string, name: string) => decodeManifest(readFileSync(join(root, manifestKey(name))), "test");

/** The page server's store counters, logged once when the (stopped) page server closed it. */
function storeClosed(d: Daemon) {
  const all = d.events().filter((e) => e.event === "store.closed");
  expect(all.length, d.log).toBe(1);
  return all[0]!;
}

describe("page-server --mem file://STORE/NAME", () => {
  test("two daemons restore from one page server, every page verified; one GET per chunk for both", async () => {
    const ps = await pageServer(`file://${store}/vm`);
    expect(ps.daemon.events().find((e) => e.event === "page_server.listening")).toMatchObject({
      address: `127.0.0.1:${ps.port}`, format: "store", path: `file://${store}/vm`, manifest: manifest(store, "vm").hash, chunkSize: 256 * 1024,
    });
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
    expect(storeClosed(ps.daemon).gets).toBe(distinct);
  }, T);

  test("the manifest's working set is fetched from startup, before any client asks", async () => {
    const ws = join(dir.path, "ws.bin");
    const order = Uint32Array.from({ length: 256 }, (_, i) => (i * 97) % (SIZE / PAGE));
    writeFileSync(ws, encodeWorkingSet(order, SIZE));
    const p = await runSnapload(["push", image, `file://${store}/withws`, "--chunk-size", "256k", "--working-set", ws]);
    expect(p.code, p.stderr).toBe(0);
    const ps = await pageServer(`file://${store}/withws`);
    expect(ps.daemon.events().find((e) => e.event === "page_server.listening")!.workingSetPages).toBe(256);
    // No client at all: the chunks still arrive.
    const fetched = await ps.daemon.waitForEvent("store.working_set_fetched");
    expect(fetched).toMatchObject({ ref: `file://${store}/withws`, failed: 0 });
    await ps.daemon.stop();
    const m = manifest(store, "withws");
    const wsChunks = new Set([...order].map((pg) => m.body.chunks[Math.floor((pg * PAGE) / m.body.chunkSize)]).filter((h) => h !== null));
    expect(fetched.chunks).toBe(wsChunks.size);
    expect(storeClosed(ps.daemon).gets).toBe(wsChunks.size);
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
    const inChunk5 = (at: unknown) => typeof at === "number" && at >= 5 * 256 * 1024 && at < 6 * 256 * 1024;
    // The daemon: its request for chunk 5's bytes was refused as unavailable; the VM killed.
    const failed = await d.waitForEvent("vm.failed");
    expect(failed).toMatchObject({ code: "BAD_FRAME", action: "killed", url: `tcp://127.0.0.1:${ps.port}`, wireCode: ErrorCode.UNAVAILABLE });
    expect(inChunk5(failed.start), `start ${failed.start}`).toBe(true);
    // The page server: chunk 5 decoded but hashed to other bytes, 3 fetches in a row; a request on the
    // client's urgent connection refused (its background connection may ask for chunk 5 too).
    const role = (client: unknown) => ps.daemon.events().find((e) => e.event === "page_server.client_authenticated" && e.client === client)?.role;
    const refused = await ps.daemon.waitForEvent("page_server.bytes_unavailable", (e) => role(e.client) === "urgent");
    expect(refused).toMatchObject({ code: "BAD_CHUNK", ref: `file://${bad}/vm`, chunkIndex: 5, hash: victim, key: chunkKey(victim), fetches: 3 });
    expect(refused.contentHash).toMatch(/^[0-9a-f]{64}$/);
    expect(refused.contentHash).not.toBe(victim);
    expect(inChunk5(refused.at), `at ${refused.at}`).toBe(true);
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
