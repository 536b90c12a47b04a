// 2 MiB hugetlbfs guests restored from a store: with 256 KiB chunks a huge page is assembled
// from 8 chunks (installed only when all 8 are verified); with 4 MiB chunks it is a slice of one.
// The pool is reserved here and given back in afterAll; if the kernel refuses, the cases are
// skipped with the reason printed (as in hugepages.test.ts).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { describeRun, ensureBuilt, reserveHugePages, runSnapload, runStandin, startDaemon, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
const SIZE = 16 * MIB;
const NEED = SIZE / (2 * MIB) + 4;

const hugePages = reserveHugePages(NEED, "store-hugepages.test.ts");
const skip = hugePages.skipReason !== "";

let dir: ReturnType<typeof tempDir>;
let image: string;

beforeAll(async () => {
  if (skip) return;
  ensureBuilt();
  dir = tempDir("snapload-store-huge-");
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, SIZE, 77);
  for (const c of ["256k", "4m"]) {
    const p = await runSnapload(["push", image, `file://${dir.path}/store/c${c}`, "--chunk-size", c]);
    expect(p.code, p.stderr).toBe(0);
  }
});

afterAll(() => {
  hugePages.restore();
  dir?.cleanup();
});

describe("2 MiB pages from a store", () => {
  for (const c of ["256k", "4m"]) {
    test.skipIf(skip)(`${c} chunks: every page verified`, async () => {
      const d = await startDaemon(["--mem", `file://${dir.path}/store/c${c}`, "--cache-dir", join(dir.path, `cache-${c}`), "--log-format", "json"], join(dir.path, `h${c}.sock`));
      try {
        const r = await runStandin(["--socket", d.socket, "--expect", image, "--hugepages", "--order", "random", "--threads", "2", "--verify", "all", "--timeout", "15000"]);
        expect(r.code, describeRun(r)).toBe(0);
        expect(r.report!.mismatches).toBe(0);
        expect(r.report!.verified).toBe(SIZE / (2 * MIB));
      } finally {
        await d.stop();
      }
    }, 30_000);
  }
});
