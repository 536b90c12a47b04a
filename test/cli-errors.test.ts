// Bad input on the command line ends in one typed line — `snapload: <message>`, exit 2 — never a
// stack trace of a bare Error/RangeError: an empty or truncated image to `inspect` and `serve`,
// and a C core that cannot be loaded.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { generateMappedRam } from "./gen-mapped-ram.ts";
import { type CliResult, ROOT, runSnapload, tempDir } from "./harness.ts";

let dir: ReturnType<typeof tempDir>;
let empty: string;
let truncated: string;

beforeAll(() => {
  dir = tempDir("snapload-cli-errors-");
  empty = join(dir.path, "empty.mem");
  writeFileSync(empty, "");
  const g = generateMappedRam(join(dir.path, "cut.snap"), { ramMiB: 2, expect: false });
  truncated = g.path;
  truncateSync(truncated, g.blocks[0]!.bitmapOffset + 10);
});
afterAll(() => dir?.cleanup());

/** Exit 2 and exactly one line on stderr, `snapload: ...` matching `pattern`; nothing that looks like a stack. */
function expectOneLine(r: CliResult, pattern: RegExp): void {
  expect(r.code, r.stderr).toBe(2);
  const lines = r.stderr.trimEnd().split("\n");
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^snapload: /);
  expect(lines[0]).toMatch(pattern);
  expect(r.stderr).not.toMatch(/Error:|^\s+at /m);
}

describe("a bad image", () => {
  test("inspect: an empty file", async () => {
    expectOneLine(await runSnapload(["inspect", empty]), /empty\.mem: image file is empty/);
  });

  test("inspect: a mapped-ram file cut inside its bitmap", async () => {
    expectOneLine(await runSnapload(["inspect", truncated]), /cut\.snap: RAM block "pc\.ram": bitmap .* past the end of the file .*\(truncated file\?\)/);
  });

  test("serve: the same files, and no socket left behind", async () => {
    for (const [file, pattern] of [[empty, /image file is empty/], [truncated, /\(truncated file\?\)/]] as const) {
      const socket = join(dir.path, "serve.sock");
      expectOneLine(await runSnapload(["serve", "--socket", socket, "--mem", file]), pattern);
      expect(existsSync(socket)).toBe(false);
    }
  });
});

describe("a C core that cannot be used", () => {
  test("SNAPLOAD_LIB naming a file that is not a library", async () => {
    const lib = join(dir.path, "not-a-library.so");
    writeFileSync(lib, "garbage");
    const r = await runSnapload(["inspect", empty], { env: { ...process.env, SNAPLOAD_LIB: lib } });
    expectOneLine(r, /cannot load the C core .*not-a-library\.so/);
  });

  test("SNAPLOAD_LIB naming a C core of another ABI version", async () => {
    // The real core, but answering sl_abi_version with 99.
    const lib = join(dir.path, "other-abi.so");
    const shim = join(dir.path, "abi99.c");
    writeFileSync(shim, "#undef sl_abi_version\nint sl_abi_version(void) { return 99; }\n");
    const cc = Bun.spawnSync([process.env.CC ?? "cc", "-O1", "-fPIC", "-shared", "-pthread", "-Dsl_abi_version=sl_abi_version_real", "-o", lib, join(ROOT, "csrc/snapload.c"), shim]);
    expect(cc.exitCode, cc.stderr.toString()).toBe(0);
    const r = await runSnapload(["inspect", empty], { env: { ...process.env, SNAPLOAD_LIB: lib } });
    expectOneLine(r, /other-abi\.so: C core ABI 99, this snapload needs \d+ \(rebuild it: bun scripts\/build-c\.ts\)/);
  });
});
