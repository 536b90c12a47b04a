// 2 MiB hugetlbfs guests (Firecracker's `huge_pages: "2M"`): the stand-in maps its regions
// MAP_HUGETLB|MAP_HUGE_2MB and announces page_size 2 MiB; every install is a whole 2 MiB page.
// The pool is reserved here (root: /proc/sys/vm/nr_hugepages) and given back in afterAll.
// If the kernel will not give us the pages, every case is skipped with the reason printed.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { generateMappedRam, generateRawImage, type GeneratedBlock, type GeneratedMappedRam } from "./gen-mapped-ram.ts";
import { type Daemon, describeRun, ensureBuilt, reserveHugePages, runStandin, startDaemon, tempDir, type StandinResult } from "./harness.ts";

const MIB = 1024 * 1024;
const HUGE = 2 * MIB;
const PAGE = 4096;
const RAW_MIB = 64;
const NEED = RAW_MIB / 2 + 8; // the largest stand-in below, plus slack
/** Per test: bunfig's [test] timeout is not applied, and the stand-in's own watchdog (5 s) must fire first. */
const T = 20_000;

const hugePages = reserveHugePages(NEED, "hugepages.test.ts");
const skip = hugePages.skipReason !== "";

let dir: ReturnType<typeof tempDir> | undefined;
let raw: string;
let rawDaemon: Daemon | undefined;
let faDaemon: Daemon | undefined;
let gen: GeneratedMappedRam;
let ram: GeneratedBlock;
let mrDaemon: Daemon | undefined;
let arm: GeneratedMappedRam;
let armDaemon: Daemon | undefined;

beforeAll(async () => {
  if (skip) return;
  ensureBuilt();
  dir = tempDir("snapload-huge-");
  raw = join(dir.path, "raw.mem");
  generateRawImage(raw, RAW_MIB * MIB, 21);
  rawDaemon = await startDaemon(["--mem", raw, "--log-format", "json"], join(dir.path, "raw.sock"));
  faDaemon = await startDaemon(["--mem", raw, "--fault-around", "4"], join(dir.path, "fa.sock"));
  gen = generateMappedRam(join(dir.path, "guest.mapped-ram"), { ramMiB: 32, seed: 5 });
  ram = gen.blocks.find((b) => b.name === "pc.ram")!;
  mrDaemon = await startDaemon(["--mem", gen.path], join(dir.path, "mr.sock"));
  arm = generateMappedRam(join(dir.path, "arm.mapped-ram"), {
    seed: 3, // block pages: random, stale, random x6
    capabilities: ["mapped-ram", "postcopy-ram"],
    blocks: [
      { name: "mach-virt.ram", usedLength: 16 * MIB, pageSize: HUGE, postcopyPageSize: HUGE },
      { name: "virt.flash0", usedLength: MIB, fill: "data" },
    ],
  });
  armDaemon = await startDaemon(["--mem", arm.path], join(dir.path, "arm.sock"));
}, 30_000);

afterAll(async () => {
  // The pool first: nothing below may stop it from being given back.
  hugePages.restore();
  await Promise.all([rawDaemon, faDaemon, mrDaemon, armDaemon].map((d) => d?.stop()));
  dir?.cleanup();
}, 15_000);

function expectClean(r: StandinResult, pages: number): void {
  // 77 = the stand-in found no huge pages after all: a failure here, since we reserved them.
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe(pages);
}

describe("raw image, 2 MiB pages", () => {
  const pages = (RAW_MIB * MIB) / HUGE;

  test.skipIf(skip)("sequential, every page verified", async () => {
    const r = await runStandin(["--timeout", "5000", "--socket", rawDaemon!.socket, "--expect", raw, "--hugepages", "--order", "seq", "--verify", "all"]);
    expectClean(r, pages);
    expect(await rawDaemon!.waitForEvent("vm.connected")).toMatchObject({ regions: 1, bytes: 64 * 1024 * 1024, pageSizes: [2 * 1024 * 1024] });
  }, T);

  test.skipIf(skip)("random order, 2 threads, every page verified", async () => {
    const r = await runStandin(["--timeout", "5000", "--socket", rawDaemon!.socket, "--expect", raw, "--hugepages", "--order", "random", "--seed", "9", "--threads", "2", "--verify", "all"]);
    expectClean(r, pages);
  }, T);

  test.skipIf(skip)("fault-around 4 (8 MiB windows), random, 2 threads", async () => {
    const r = await runStandin(["--timeout", "5000", "--socket", faDaemon!.socket, "--expect", raw, "--hugepages", "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r, pages);
  }, T);

  test.skipIf(skip)("balloon before touch (0:8m): those pages read as zeros", async () => {
    const r = await runStandin(["--timeout", "5000", "--socket", rawDaemon!.socket, "--expect", raw, "--hugepages", "--balloon", "0:8m", "--order", "random", "--verify", "all"]);
    expectClean(r, pages);
  }, T);

  test.skipIf(skip)("balloon after touch (16m:8m): installed, discarded, then zeros", async () => {
    const r = await runStandin(["--timeout", "5000", "--socket", rawDaemon!.socket, "--expect", raw, "--hugepages", "--balloon-after", "16m:8m", "--order", "seq", "--threads", "2", "--verify", "all"]);
    expectClean(r, pages);
  }, T);
});

describe("balloon right after the last fault (the handler may be detaching)", () => {
  test.skipIf(skip)("10 rounds: MADV_DONTNEED never hangs, ballooned pages read zeros", async () => {
    for (let round = 0; round < 10; round++) {
      const r = await runStandin(["--timeout", "3000", "--socket", rawDaemon!.socket, "--expect", raw, "--hugepages", "--region", "16m@0", "--balloon-after", "4m:4m", "--order", "seq", "--threads", "2", "--verify", "all"]);
      expect(r.code, `round ${round}: ${describeRun(r)}`).toBe(0);
      expect(r.report!.mismatches).toBe(0);
    }
  }, 40_000);
});

describe("mapped-ram image, 2 MiB pages assembled from 4 KiB data and zero pages", () => {
  test.skipIf(skip)("the served block has 2 MiB pages mixing data, zero and stale (bitmap 0, junk in the file) pages", () => {
    const per = HUGE / PAGE;
    let mixedWithStale = 0;
    for (let h = 0; h < ram.usedLength / HUGE; h++) {
      const kinds = ram.kinds.slice(h * per, (h + 1) * per);
      const data = kinds.some((k) => k !== "zero" && k !== "stale");
      const zero = kinds.some((k) => k === "zero");
      const stale = kinds.some((k) => k === "stale");
      if (data && zero && stale) mixedWithStale++;
    }
    expect(mixedWithStale).toBeGreaterThanOrEqual(8);
    expect(ram.usedLength % HUGE).toBe(0);
  });

  test.skipIf(skip)("random order, 2 threads, every page verified", async () => {
    const r = await runStandin(["--timeout", "5000", "--socket", mrDaemon!.socket, "--expect", ram.expectFile!, "--hugepages", "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r, ram.usedLength / HUGE);
  }, T);

  test.skipIf(skip)("sequential, with a balloon after touch", async () => {
    const r = await runStandin(["--timeout", "5000", "--socket", mrDaemon!.socket, "--expect", ram.expectFile!, "--hugepages", "--order", "seq", "--balloon-after", "4m:4m", "--verify", "all"]);
    expectClean(r, ram.usedLength / HUGE);
  }, T);

  test.skipIf(skip)("two regions, second half first", async () => {
    const half = ram.usedLength / 2;
    const r = await runStandin([
      "--socket", mrDaemon!.socket, "--expect", ram.expectFile!, "--hugepages",
      "--region", `${half}@${half}`, "--region", `${half}@0`, "--order", "random", "--verify", "all",
    ]);
    expectClean(r, ram.usedLength / HUGE);
  }, T);
});

describe("mapped-ram block with 2 MiB pages of its own", () => {
  test.skipIf(skip)("a stale 2 MiB page (bitmap 0, junk in the file) reads as zeros", async () => {
    const main = arm.blocks[0]!;
    expect(main.kinds).toContain("stale");
    const r = await runStandin(["--timeout", "5000", "--socket", armDaemon!.socket, "--expect", main.expectFile!, "--hugepages", "--order", "random", "--threads", "2", "--verify", "all"]);
    expectClean(r, main.usedLength / HUGE);
  }, T);
});
