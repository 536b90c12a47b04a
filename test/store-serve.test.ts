// `serve --mem file://STORE/NAME` end to end: lazy restores through the host chunk cache with the
// VMM stand-in verifying every page; a warm cache restores with the store gone; a chunk tampered
// with in the store or in the cache is never installed.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { cpSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chunkKey, decodeManifest, encodeChunk, manifestKey } from "../src/sources/store/format.ts";
import { encodeWorkingSet } from "../src/scheduler/working-set.ts";
import { generateMappedRam } from "./gen-mapped-ram.ts";
import { type Daemon, describeRun, ensureBuilt, runSnapload, runStandin, STANDIN, type StandinResult, pushDemoImage, startDaemon, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;
const SIZE = 32 * MIB;
const T = 60_000;
let dir: ReturnType<typeof tempDir>;
let image: string;
let store: string;
let sockets = 0;

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir();
  ({ image, store } = await pushDemoImage(dir.path, SIZE, 21, ["--chunk-size", "256k"]));
});

afterAll(() => dir?.cleanup());

function expectClean(r: StandinResult, verified = SIZE / PAGE): void {
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe(verified);
}

async function serve(mem: string, cache: string, extra: string[] = []) {
  return startDaemon(["--mem", mem, "--cache-dir", cache, "--log-level", "debug", "--log-format", "json", ...extra], join(dir.path, `s${++sockets}.sock`));
}

/** The store's counters, logged once when the (stopped) daemon closed it. */
function storeClosed(d: Daemon) {
  const all = d.events().filter((e) => e.event === "store.closed");
  expect(all.length, d.log).toBe(1);
  return all[0]!;
}

function manifestOf(name: string) {
  return decodeManifest(readFileSync(join(store, manifestKey(name))), "test");
}

describe("lazy restore from a file:// store", () => {
  test("cold cache, then warm: every page verified; one GET per chunk for two VMs at once", async () => {
    const cache = join(dir.path, "cache-a");
    const d = await serve(`file://${store}/vm`, cache);
    try {
      expect(d.events().find((e) => e.event === "daemon.listening")).toMatchObject({
        mem: `file://${store}/vm`, format: "store", manifest: manifestOf("vm").hash, size: SIZE, chunkSize: 256 * 1024,
      });
      const [a, b] = await Promise.all([
        runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--seed", "1", "--verify", "all"]),
        runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--seed", "2", "--threads", "2", "--verify", "all"]),
      ]);
      expectClean(a);
      expectClean(b);
      expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--region", "8m@0", "--region", "8m@16m", "--far", "--order", "random", "--verify", "all"]), (16 * MIB) / PAGE);
    } finally {
      await d.stop();
    }
    const distinct = new Set(manifestOf("vm").body.chunks.filter((h) => h !== null)).size;
    expect(storeClosed(d).gets).toBe(distinct);
    expect(readdirSync(join(cache, "chunks")).length).toBeGreaterThan(0);
  }, T);

  test("a warm host cache restores with the store's chunks gone (a new daemon, no network)", async () => {
    const cache = join(dir.path, "cache-b");
    const d1 = await serve(`file://${store}/vm`, cache);
    expectClean(await runStandin(["--socket", d1.socket, "--expect", image, "--order", "seq", "--verify", "all"]));
    await d1.stop();
    renameSync(join(store, "chunks"), join(store, "chunks.away"));
    try {
      const d2 = await serve(`file://${store}/vm`, cache);
      try {
        expectClean(await runStandin(["--socket", d2.socket, "--expect", image, "--order", "random", "--verify", "all"]));
      } finally {
        await d2.stop();
      }
      expect(storeClosed(d2).gets).toBe(0);
      // Before listening, the store's fault path was JIT-warmed through a requester of its own
      // (the store, whose chunks are gone, was not asked: 0 GETs above).
      expect(d2.events().find((e) => e.event === "daemon.warm_up")).toMatchObject({ done: true, remoteRealFaults: 150 * 64 });
    } finally {
      renameSync(join(store, "chunks.away"), join(store, "chunks"));
    }
  }, T);

  test("--populate background fetches every chunk and detaches the VM", async () => {
    const d = await serve(`file://${store}/vm`, join(dir.path, "cache-c"), ["--populate", "background"]);
    try {
      // The guest touches 5%, then idles (--pause) while the rest comes in the background.
      const run = runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--fraction", "0.05", "--pause", "2000", "--verify", "all"]);
      await d.waitForEvent("vm.detached", (e) => e.vm === 1, 30_000);
      expectClean(await run);
    } finally {
      await d.stop();
    }
  }, T);

  test("the manifest's working set is prefetched first", async () => {
    const ws = join(dir.path, "ws.bin");
    const order = Uint32Array.from({ length: 512 }, (_, i) => (i * 61) % (SIZE / PAGE));
    writeFileSync(ws, encodeWorkingSet(order, SIZE));
    const p = await runSnapload(["push", image, `file://${store}/withws`, "--chunk-size", "256k", "--working-set", ws]);
    expect(p.code, p.stderr).toBe(0);
    const ins = await runSnapload(["inspect", `file://${store}/withws`, "--json"]);
    expect(JSON.parse(ins.stdout).workingSetPages).toBe(512);
    const d = await serve(`file://${store}/withws`, join(dir.path, "cache-d"));
    try {
      expect(d.events().find((e) => e.event === "daemon.listening")!.prefetchPages).toBe(512);
      expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--verify", "all"]));
    } finally {
      await d.stop();
    }
    expect(d.events().find((e) => e.event === "vm.exited")!.reason).toBe("VMM hung up");
  }, T);
});

describe("the host chunk cache", () => {
  test("--cache-size: least recently used chunks are evicted (and unmapped, fetched again when needed); the cache stays within its size", async () => {
    const cache = join(dir.path, "cache-small");
    const d = await serve(`file://${store}/vm`, cache, ["--cache-size", "1m"]);
    try {
      expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--order", "seq", "--verify", "all"]));
      expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]));
    } finally {
      await d.stop();
    }
    const distinct = new Set(manifestOf("vm").body.chunks.filter((h) => h !== null)).size;
    const closed = storeClosed(d);
    expect(closed.gets).toBeGreaterThan(distinct);
    expect(closed.cacheEvicted).toBeGreaterThan(0);
    let bytes = 0;
    for (const sub of readdirSync(join(cache, "chunks"))) for (const f of readdirSync(join(cache, "chunks", sub))) bytes += statSync(join(cache, "chunks", sub, f)).size;
    expect(bytes).toBeLessThanOrEqual(1024 * 1024);
  }, T);

  const isRoot = process.getuid?.() === 0;
  test.skipIf(!isRoot)(`a full cache disk (a 256 KiB tmpfs): chunks stay in memory, the restore is correct, one warning${isRoot ? "" : " (skipped: mounting a tmpfs needs root)"}`, async () => {
    const mnt = join(dir.path, "tiny");
    mkdirSync(mnt);
    const m = Bun.spawnSync(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt]);
    expect(m.exitCode, m.stderr.toString()).toBe(0);
    try {
      const d = await serve(`file://${store}/vm`, mnt);
      try {
        expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--verify", "all"]));
      } finally {
        await d.stop();
      }
      const warnings = d.events().filter((e) => e.event === "store.cache_write_failed");
      expect(warnings.length).toBe(1);
      expect(warnings[0]!.dir).toBe(mnt);
      expect(String(warnings[0]!.reason)).toMatch(/ENOSPC|no space/i);
    } finally {
      Bun.spawnSync(["umount", mnt]);
    }
  }, T);
});

describe("QEMU mapped-ram files", () => {
  test("push stores the RAM block (stale bytes of zero pages never), with the file's geometry; pull and a restore match the block", async () => {
    const gen = generateMappedRam(join(dir.path, "guest.mapped-ram"), { ramMiB: 24, seed: 12 });
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    const p = await runSnapload(["push", gen.path, `file://${store}/qemu`]);
    expect(p.code, p.stderr).toBe(0);
    const ins = await runSnapload(["inspect", `file://${store}/qemu`, "--json"]);
    const rep = JSON.parse(ins.stdout);
    expect(rep).toMatchObject({ source: "mapped-ram", block: "pc.ram", size: ram.usedLength, blockPageSize: 4096 });
    expect(rep.blocks.map((b: { name: string }) => b.name)).toEqual(gen.blocks.map((b) => b.name));
    const out = join(dir.path, "qemu.raw");
    expect((await runSnapload(["pull", `file://${store}/qemu`, out])).code).toBe(0);
    expect(Bun.hash(readFileSync(out))).toBe(Bun.hash(readFileSync(ram.expectFile!)));
    const d = await serve(`file://${store}/qemu`, join(dir.path, "cache-q"));
    try {
      expectClean(await runStandin(["--socket", d.socket, "--expect", ram.expectFile!, "--order", "random", "--threads", "2", "--verify", "all"]), ram.usedLength / PAGE);
    } finally {
      await d.stop();
    }
    const bios = await runSnapload(["push", gen.path, `file://${store}/bios`, "--ramblock", "pc.bios"]);
    expect(bios.code, bios.stderr).toBe(0);
    expect(bios.stdout).toMatch(/pushed .*\/bios: 256 KiB in 1 chunks/);
  }, T);
});

describe("never a wrong page", () => {
  test("a chunk tampered with in the store: never installed, the VM is killed with a clear error, others unaffected", async () => {
    const bad = join(dir.path, "badstore");
    cpSync(store, bad, { recursive: true });
    const m = manifestOf("vm");
    // Replace chunk 5 by a valid chunk object of other bytes: only the hash check can catch it.
    const victim = m.body.chunks[5]!;
    writeFileSync(join(bad, chunkKey(victim)), encodeChunk(new Uint8Array(256 * 1024).fill(0x5a), 3).object);
    const d = await serve(`file://${bad}/vm`, join(dir.path, "cache-e"), ["--page-server-deadline", "2000"]);
    try {
      // Touch only chunk 5's pages (256 KiB at 1.25 MiB): the VM must die, not read them.
      const doomed = Bun.spawn([STANDIN, "--socket", d.socket, "--expect", image, "--region", `256k@${5 * 256}k`, "--order", "seq"], { stdout: "pipe", stderr: "pipe" });
      await doomed.exited;
      expect(doomed.signalCode).toBe("SIGKILL");
      const failed = await d.waitForEvent("vm.failed");
      // The chunk decoded, but its bytes hash to something else, on each of 3 fetches in a row.
      expect(failed).toMatchObject({ code: "BAD_CHUNK", action: "killed", ref: `file://${bad}/vm`, chunkIndex: 5, hash: victim, key: chunkKey(victim), url: `file://${bad}`, fetches: 3 });
      expect(failed.contentHash).toMatch(/^[0-9a-f]{64}$/);
      expect(failed.contentHash).not.toBe(victim);
      // Another VM on the same daemon, touching other chunks, restores fine.
      expectClean(await runStandin(["--socket", d.socket, "--expect", image, "--region", "1m@0", "--region", "8m@16m", "--verify", "all"]), (9 * MIB) / PAGE);
    } finally {
      await d.stop();
    }
  }, T);

  test("a missing chunk: the VM is killed, naming the object", async () => {
    const bad = join(dir.path, "holestore");
    cpSync(store, bad, { recursive: true });
    rmSync(join(bad, chunkKey(manifestOf("vm").body.chunks[2]!)));
    const d = await serve(`file://${bad}/vm`, join(dir.path, "cache-f"));
    try {
      const doomed = Bun.spawn([STANDIN, "--socket", d.socket, "--expect", image, "--region", "256k@512k"], { stdout: "pipe", stderr: "pipe" });
      await doomed.exited;
      expect(doomed.signalCode).toBe("SIGKILL");
      const failed = await d.waitForEvent("vm.failed");
      const h = manifestOf("vm").body.chunks[2]!;
      expect(failed).toMatchObject({ code: "NOT_FOUND", action: "killed", ref: `file://${bad}/vm`, chunkIndex: 2, hash: h, key: chunkKey(h), url: `file://${bad}` });
    } finally {
      await d.stop();
    }
  }, T);

  test("a chunk tampered with in the host cache: detected on read, deleted, fetched again; the restore is correct", async () => {
    const cache = join(dir.path, "cache-g");
    const d1 = await serve(`file://${store}/vm`, cache);
    expectClean(await runStandin(["--socket", d1.socket, "--expect", image, "--order", "seq", "--verify", "all"]));
    await d1.stop();
    const h = manifestOf("vm").body.chunks[7]!;
    const path = join(cache, chunkKey(h));
    const bytes = readFileSync(path);
    bytes[1000] = bytes[1000]! ^ 0x01;
    writeFileSync(path, bytes);
    const d2 = await serve(`file://${store}/vm`, cache);
    try {
      expectClean(await runStandin(["--socket", d2.socket, "--expect", image, "--order", "random", "--verify", "all"]));
    } finally {
      await d2.stop();
    }
    const corrupt = d2.events().filter((e) => e.event === "store.cache_corrupt");
    expect(corrupt.map((e) => e.path)).toEqual([path]);
    expect(storeClosed(d2)).toMatchObject({ gets: 1, cacheCorrupt: 1 });
  }, T);

  test("a store that is not there: serve refuses to start with one clear line", async () => {
    const r = await runSnapload(["serve", "--socket", join(dir.path, "x.sock"), "--mem", `file://${store}/nosuch`, "--cache-dir", join(dir.path, "cache-h")]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/snapload: file:\/\/.*: no snapshot named "nosuch" \(no object snapshots\/nosuch\)/);
  });
});
