// End to end: `snapload serve --mem FILE` on a QEMU mapped-ram file (made by the independent
// generator in gen-mapped-ram.ts), restored by the C VMM stand-in against each block's flat
// expected contents. Bitmap-0 pages have stale non-zero bytes in the file: they must read as zeros.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, copyFileSync, existsSync, openSync, readSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { generateMappedRam, PAGES_ALIGN, type GeneratedBlock, type GeneratedMappedRam } from "./gen-mapped-ram.ts";
import { type Daemon, describeRun, ensureBuilt, parseEvents as events, patchFile, runSnapload, REFUSED, runHostilePeer, runStandin, startDaemon, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;
const VGA = "0000:00:02.0/vga.vram";
/** Per test: bunfig's [test] timeout is not applied, and the stand-in's own watchdog (5 s) must fire first. */
const T = 20_000;

let dir: ReturnType<typeof tempDir>;
let gen: GeneratedMappedRam;
let ram: GeneratedBlock;
let vga: GeneratedBlock;
const daemons: Daemon[] = [];

beforeAll(() => {
  ensureBuilt();
  dir = tempDir("snapload-mrserve-");
  gen = generateMappedRam(join(dir.path, "guest.mapped-ram"), { ramMiB: 24, seed: 11 });
  ram = gen.blocks.find((b) => b.name === "pc.ram")!;
  vga = gen.blocks.find((b) => b.name === VGA)!;
}, 30_000);

afterAll(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  dir?.cleanup();
}, 15_000);

async function serve(args: string[], name: string): Promise<Daemon> {
  const d = await startDaemon(["--mem", gen.path, "--handshake-timeout", "2000", "--log-format", "json", ...args], join(dir.path, `${name}.sock`));
  daemons.push(d);
  return d;
}

function readAt(path: string, offset: number, len: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

const be64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return [...b];
};

describe("the generated file has what the cases rely on", () => {
  test("several blocks, 1 MiB aligned pages, zero pages, stale bytes behind bitmap-0 pages", () => {
    expect(gen.blocks.length).toBeGreaterThanOrEqual(5);
    for (const b of gen.blocks) expect(b.pagesOffset % PAGES_ALIGN).toBe(0);
    for (const b of [ram, vga]) {
      expect(b.kinds.filter((k) => k === "zero").length).toBeGreaterThan(10);
      expect(b.dataPages).toBeGreaterThan(10);
      const stale = b.kinds.map((k, i) => (k === "stale" ? i : -1)).filter((i) => i >= 0);
      expect(stale.length).toBeGreaterThan(3);
      // The file really holds junk there, and the bitmap says zero.
      for (const i of stale.slice(0, 5)) {
        expect(readAt(gen.path, b.pagesOffset + i * PAGE, PAGE).some((x) => x !== 0)).toBe(true);
        expect((b.bitmap[i >> 3]! >> (i & 7)) & 1).toBe(0);
        expect(readAt(b.expectFile!, i * PAGE, PAGE).every((x) => x === 0)).toBe(true);
      }
    }
    // pc.ram is the largest block: serve's default.
    expect(Math.max(...gen.blocks.map((b) => b.usedLength))).toBe(ram.usedLength);
  });
});

describe("serve a mapped-ram file", () => {
  let defaultDaemon: Daemon;
  test("default block (pc.ram): random order, 2 threads, every page verified", async () => {
    const d = (defaultDaemon = await serve([], "default"));
    expect(await d.waitForEvent("daemon.listening")).toMatchObject({ format: "mapped-ram", block: "pc.ram", size: ram.usedLength, dataPages: ram.dataPages });
    const r = await runStandin(["--timeout", "5000", "--socket", d.socket, "--expect", ram.expectFile!, "--order", "random", "--seed", "5", "--threads", "2", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.mismatches).toBe(0);
    expect(r.report!.verified).toBe(ram.usedLength / PAGE);
    expect(r.report!.pages).toBe(ram.usedLength / PAGE);
  }, T);

  test("default block with fault-around 64: runs mixing data, zero and stale pages", async () => {
    const d = await serve(["--fault-around", "64"], "fa64");
    for (const order of ["seq", "random"]) {
      const r = await runStandin(["--timeout", "5000", "--socket", d.socket, "--expect", ram.expectFile!, "--order", order, "--threads", "2", "--verify", "all"]);
      expect(r.code, `${order}: ${describeRun(r)}`).toBe(0);
      expect(r.report!.mismatches).toBe(0);
      expect(r.report!.verified).toBe(ram.usedLength / PAGE);
    }
  }, T);

  test("two regions of pc.ram, out of order, far apart", async () => {
    const d = defaultDaemon;
    expect(d).toBeDefined();
    const half = ram.usedLength / 2;
    const r = await runStandin([
      "--socket", d.socket, "--expect", ram.expectFile!,
      "--region", `${half}@${half}`, "--region", `${half}@0`, "--far", "--order", "random", "--verify", "all",
    ]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.mismatches).toBe(0);
    expect(r.report!.verified).toBe(ram.usedLength / PAGE);
  }, T);

  test("balloon right after the last fault, 20 rounds: MADV_DONTNEED never hangs, zeros read back", async () => {
    const d = defaultDaemon;
    expect(d).toBeDefined();
    for (let round = 0; round < 20; round++) {
      const r = await runStandin(["--timeout", "3000", "--socket", d.socket, "--expect", ram.expectFile!, "--region", "2m@0", "--balloon-after", "1m:1m", "--order", "seq", "--threads", "2", "--verify", "all"]);
      expect(r.code, `round ${round}: ${describeRun(r)}`).toBe(0);
      expect(r.report!.mismatches).toBe(0);
    }
  }, 40_000);

  let vgaDaemon: Daemon;
  test("--ramblock names a smaller block (vga.vram): served with its own contents", async () => {
    vgaDaemon = await serve(["--ramblock", VGA], "vga");
    expect(await vgaDaemon.waitForEvent("daemon.listening")).toMatchObject({ format: "mapped-ram", block: VGA, size: vga.usedLength, dataPages: vga.dataPages });
    const r = await runStandin(["--timeout", "5000", "--socket", vgaDaemon.socket, "--expect", vga.expectFile!, "--order", "random", "--threads", "2", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.mismatches).toBe(0);
    expect(r.report!.verified).toBe(vga.usedLength / PAGE);
  }, T);

  test("a region reaching past the end of the chosen block is rejected", async () => {
    expect(vgaDaemon).toBeDefined();
    // vga.vram is 2 MiB: a region [1 MiB, +2 MiB) ends 1 MiB past it (pc.ram would have room).
    const r = await runHostilePeer(["--socket", vgaDaemon.socket, "--region", `${2 * MIB}@${MIB}`]);
    expect(r.code, describeRun(r)).toBe(REFUSED);
    const e = await vgaDaemon.waitForEvent("peer.rejected");
    expect(e).toMatchObject({ code: "REGION_OUT_OF_IMAGE", region: 0, offset: MIB, size: 2 * MIB, imageSize: vga.usedLength });
    // The same daemon still serves a good VM afterwards.
    const ok = await runStandin(["--timeout", "5000", "--socket", vgaDaemon.socket, "--expect", vga.expectFile!, "--verify", "all"]);
    expect(ok.code, describeRun(ok)).toBe(0);
    expect(ok.report!.mismatches).toBe(0);
  }, T);

  test("a region past the end of the default block is rejected too", async () => {
    const d = defaultDaemon;
    expect(d).toBeDefined();
    const r = await runHostilePeer(["--socket", d.socket, "--region", `${4 * MIB}@${ram.usedLength - 2 * MIB}`]);
    expect(r.code, describeRun(r)).toBe(REFUSED);
    const e = await d.waitForEvent("peer.rejected");
    expect(e).toMatchObject({ code: "REGION_OUT_OF_IMAGE", region: 0, offset: ram.usedLength - 2 * MIB, size: 4 * MIB, imageSize: ram.usedLength });
  }, T);
});

describe("a block with 2 MiB pages (postcopy-ram records the page size)", () => {
  test("a stale 2 MiB page (bitmap 0, junk in the file) reads as zeros in a 4 KiB VM", async () => {
    const arm = generateMappedRam(join(dir.path, "arm.mapped-ram"), {
      seed: 3, // block pages: random, stale, random x6
      capabilities: ["mapped-ram", "postcopy-ram"],
      blocks: [
        { name: "mach-virt.ram", usedLength: 16 * MIB, pageSize: 2 * MIB, postcopyPageSize: 2 * MIB },
        { name: "virt.flash0", usedLength: MIB, fill: "data" },
      ],
    });
    const main = arm.blocks[0]!;
    expect(main.kinds).toContain("stale");
    expect(main.kinds.some((k) => k !== "zero" && k !== "stale")).toBe(true);
    const d = await startDaemon(["--mem", arm.path, "--fault-around", "16", "--log-format", "json"], join(dir.path, "arm.sock"));
    daemons.push(d);
    expect(await d.waitForEvent("daemon.listening")).toMatchObject({ format: "mapped-ram", block: "mach-virt.ram", size: main.usedLength });
    const r = await runStandin(["--timeout", "5000", "--socket", d.socket, "--expect", main.expectFile!, "--order", "random", "--threads", "2", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.mismatches).toBe(0);
    expect(r.report!.verified).toBe(main.usedLength / PAGE);
  }, T);
});

describe("serve refuses to start", () => {
  test("unknown --ramblock: non-zero exit, names every block, no socket left behind", async () => {
    const sock = join(dir.path, "unknown.sock");
    const r = await runSnapload(["serve", "--socket", sock, "--mem", gen.path, "--ramblock", "pc.rom", "--log-format", "json"]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('no RAM block named "pc.rom"');
    for (const b of gen.blocks) expect(r.stderr).toContain(`"${b.name}"`);
    expect(events(r.stderr).map((e) => e.event)).not.toContain("daemon.listening");
    expect(existsSync(sock)).toBe(false);
  }, T);

  const broken: [string, (path: string) => void, RegExp][] = [
    [
      "truncated in the middle of pc.ram's pages",
      (p) => truncateSync(p, ram.pagesOffset + ram.usedLength / 2),
      /truncated file\?/,
    ],
    ["truncated inside the block records", (p) => truncateSync(p, ram.headerOffset + 10), /truncated file\?/],
    [
      "total RAM size smaller than the blocks written",
      (p) => patchFile(p, gen.totalOffset, be64(ram.usedLength + 0x04)),
      /another RAM block record follows/,
    ],
    [
      "pages_offset not 1 MiB aligned",
      (p) => patchFile(p, ram.headerOffset + 20, be64(ram.pagesOffset + PAGE)),
      /not aligned to 1 MiB/,
    ],
  ];
  for (const [name, breakIt, pattern] of broken) {
    test(`${name}: non-zero exit with a clear message`, async () => {
      const bad = join(dir.path, `bad-${name.replace(/\W+/g, "-")}.mapped-ram`);
      copyFileSync(gen.path, bad);
      breakIt(bad);
      const sock = join(dir.path, "bad.sock");
      const r = await runSnapload(["serve", "--socket", sock, "--mem", bad, "--log-format", "json"]);
      expect(r.code, r.stderr).not.toBe(0);
      expect(r.stderr).toMatch(pattern);
      expect(r.stderr).toContain(bad);
      expect(events(r.stderr).map((e) => e.event)).not.toContain("daemon.listening");
      expect(existsSync(sock)).toBe(false);
    }, T);
  }
});
