// The VMM stand-in is part of the product (`snapload demo` runs it): its documentation
// (docs/vmm-standin.md) lists exactly the flags it takes, and it refuses the hostile peer's.
import { beforeAll, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ensureBuilt, ROOT, STANDIN } from "./harness.ts";

beforeAll(() => ensureBuilt());

const flagsIn = (text: string, pattern: RegExp) => [...new Set([...text.matchAll(pattern)].map((m) => m[1]!))].sort();

test("docs/vmm-standin.md documents exactly the flags of vmm-standin --help", () => {
  const help = Bun.spawnSync([STANDIN, "--help"]);
  expect(help.exitCode).toBe(0);
  const usage = flagsIn(help.stdout.toString(), /\[?(--[a-z-]+)/g);
  const doc = flagsIn(readFileSync(join(ROOT, "docs/vmm-standin.md"), "utf8"), /^\| `(--[a-z-]+)/gm);
  expect(usage.length).toBeGreaterThan(10);
  expect(doc).toEqual(usage);
});

test("the hostile roles are not the stand-in's: their flags are refused (exit 2)", () => {
  for (const flag of [["--body", "[]"], ["--garbage", "10"], ["--fds", "none"], ["--silent"], ["--expect-reject"], ["--announce-half"]]) {
    const r = Bun.spawnSync([STANDIN, "--socket", "/nonexistent", ...flag]);
    expect(r.exitCode, flag.join(" ")).toBe(2);
    expect(r.stderr.toString()).toContain("standin: unknown option");
  }
});
