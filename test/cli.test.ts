// The `snapload` command line, run as a process: inspect output (text and --json) checked against
// counts taken from the generators' own page lists, help, and the exit code 2 usage errors.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { generateMappedRam, generateRawImage, type GeneratedMappedRam, type GeneratedRaw, type PageKind } from "./gen-mapped-ram.ts";
import { ensureBuilt, runSnapload, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;
const VGA = "0000:00:02.0/vga.vram";

let dir: ReturnType<typeof tempDir>;
let raw: GeneratedRaw;
let mr: GeneratedMappedRam;
let huge: GeneratedMappedRam;

beforeAll(() => {
  ensureBuilt();
  dir = tempDir("snapload-cli-");
  raw = generateRawImage(join(dir.path, "vm.mem"), 6 * MIB, 4);
  mr = generateMappedRam(join(dir.path, "guest.mapped-ram"), { ramMiB: 8, seed: 3 });
  // An arm-style file whose main block has 2 MiB pages (postcopy-ram records the page size).
  huge = generateMappedRam(join(dir.path, "arm.mapped-ram"), {
    seed: 6, // pages: text, random x3, text, zero x3
    capabilities: ["mapped-ram", "postcopy-ram"],
    blocks: [
      { name: "mach-virt.ram", usedLength: 16 * MIB, pageSize: 2 * MIB, postcopyPageSize: 2 * MIB },
      { name: "virt.flash0", usedLength: 1 * MIB, fill: "data" },
    ],
  });
}, 30_000);

afterAll(() => dir?.cleanup());

/** Counted here from the generator's page list, not taken from its totals. */
function count(kinds: PageKind[]): { data: number; zero: number } {
  let data = 0;
  for (const k of kinds) if (k !== "zero" && k !== "stale") data++;
  return { data, zero: kinds.length - data };
}

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

describe("snapload inspect", () => {
  test("raw image: text", async () => {
    const r = await runSnapload(["inspect", raw.path]);
    expect(r.code, r.stderr).toBe(0);
    const { data, zero } = count(raw.kinds);
    expect(data).toBeGreaterThan(100);
    expect(zero).toBeGreaterThan(100);
    expect(r.stdout).toMatch(/^format:\s+raw$/m);
    expect(r.stdout).toContain(raw.path);
    expect(r.stdout).toMatch(new RegExp(`^size:\\s+${6 * MIB} bytes`, "m"));
    expect(r.stdout).toMatch(new RegExp(`^data pages:\\s+${data} `, "m"));
    expect(r.stdout).toMatch(new RegExp(`^zero pages:\\s+${zero} `, "m"));
    expect(r.stdout).not.toMatch(/^blocks:/m);
  });

  test("raw image: --json", async () => {
    const r = await runSnapload(["inspect", raw.path, "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    const { data, zero } = count(raw.kinds);
    expect(j).toMatchObject({ format: "raw", size: 6 * MIB, pageSize: PAGE, dataPages: data, zeroPages: zero, dataBytes: data * PAGE, zeroBytes: zero * PAGE });
    expect(j.blocks).toBeUndefined();
  });

  test("mapped-ram: text lists every block with its data/zero pages; pc.ram is served", async () => {
    const r = await runSnapload(["inspect", mr.path]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^format:\s+mapped-ram$/m);
    expect(r.stdout).toMatch(/^block:\s+pc\.ram \(default: the largest block\)$/m);
    const ram = count(mr.blocks.find((b) => b.name === "pc.ram")!.kinds);
    expect(r.stdout).toMatch(new RegExp(`^data pages:\\s+${ram.data} `, "m"));
    expect(r.stdout).toMatch(new RegExp(`^zero pages:\\s+${ram.zero} `, "m"));
    expect(r.stdout).toMatch(new RegExp(`^blocks:\\s+${mr.blocks.length} `, "m"));
    for (const b of mr.blocks) {
      const { data, zero } = count(b.kinds);
      const star = b.name === "pc.ram" ? "\\*" : " ";
      const row = new RegExp(
        `^\\s*${star}\\s+${esc(b.name)}\\s+${b.usedLength}\\s+[\\d.]+\\s+${b.pageSize}\\s+${data}\\s+${zero}\\s+0x${b.bitmapOffset.toString(16)}\\s+0x${b.pagesOffset.toString(16)}$`,
        "m",
      );
      expect(r.stdout, `row for ${b.name}`).toMatch(row);
    }
  });

  test("mapped-ram: --json matches the generator", async () => {
    const r = await runSnapload(["inspect", "--json", mr.path]);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    const ram = count(mr.blocks.find((b) => b.name === "pc.ram")!.kinds);
    expect(j).toMatchObject({ format: "mapped-ram", block: "pc.ram", defaultBlock: "pc.ram", size: 8 * MIB, pageSize: PAGE, dataPages: ram.data, zeroPages: ram.zero });
    expect(j.blocks.map((b: { name: string }) => b.name)).toEqual(mr.blocks.map((b) => b.name));
    for (const [i, b] of mr.blocks.entries()) {
      const { data, zero } = count(b.kinds);
      expect(j.blocks[i]).toMatchObject({
        name: b.name,
        usedLength: b.usedLength,
        pageSize: b.pageSize,
        pages: b.pages,
        dataPages: data,
        zeroPages: zero,
        recordOffset: b.recordOffset,
        bitmapOffset: b.bitmapOffset,
        pagesOffset: b.pagesOffset,
      });
    }
  });

  test("mapped-ram: --ramblock describes that block", async () => {
    const r = await runSnapload(["inspect", mr.path, "--ramblock", VGA]);
    expect(r.code, r.stderr).toBe(0);
    const vga = count(mr.blocks.find((b) => b.name === VGA)!.kinds);
    expect(r.stdout).toContain(`block:      ${VGA} (chosen; default would be pc.ram)`);
    expect(r.stdout).toMatch(new RegExp(`^size:\\s+${2 * MIB} bytes`, "m"));
    expect(r.stdout).toMatch(new RegExp(`^data pages:\\s+${vga.data} `, "m"));
    expect(r.stdout).toMatch(new RegExp(`^zero pages:\\s+${vga.zero} `, "m"));
  });

  test("mapped-ram with 2 MiB block pages: counts per block page, 4 KiB totals", async () => {
    const r = await runSnapload(["inspect", huge.path, "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    const main = count(huge.blocks[0]!.kinds);
    expect(main.data).toBeGreaterThan(0);
    expect(main.zero).toBeGreaterThan(0);
    expect(j).toMatchObject({ format: "mapped-ram", block: "mach-virt.ram", pageSize: 2 * MIB, dataPages: main.data * 512, zeroPages: main.zero * 512 });
    expect(j.blocks[0]).toMatchObject({ name: "mach-virt.ram", pageSize: 2 * MIB, pages: 8, dataPages: main.data, zeroPages: main.zero });
    expect(j.blocks[1]).toMatchObject({ name: "virt.flash0", pageSize: PAGE, dataPages: 256, zeroPages: 0 });
  });

  test("unknown --ramblock: exit 2, every block named", async () => {
    const r = await runSnapload(["inspect", mr.path, "--ramblock", "nope"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('no RAM block named "nope"');
    for (const b of mr.blocks) expect(r.stderr).toContain(`"${b.name}"`);
  });

  test("--ramblock on a raw image: exit 2", async () => {
    const r = await runSnapload(["inspect", raw.path, "--ramblock", "pc.ram"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("applies only to QEMU mapped-ram files");
  });

  test("two files: exit 2", async () => {
    const r = await runSnapload(["inspect", raw.path, mr.path]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("inspect takes one FILE");
  });

  test("a missing file: the error names the path", async () => {
    const missing = join(dir.path, "no-such-image.mem");
    const r = await runSnapload(["inspect", missing]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain("ENOENT");
    expect(r.stderr).toContain(missing);
  });
});

describe("help and usage errors", () => {
  test("help: exit 0 with the usage", async () => {
    for (const h of ["help", "--help", "-h"]) {
      const r = await runSnapload([h]);
      expect(r.code, h).toBe(0);
      expect(r.stdout).toContain("usage:");
      for (const c of ["snapload serve", "snapload inspect", "snapload demo"]) expect(r.stdout).toContain(c);
    }
  });

  test("no command: the usage, exit 2", async () => {
    const r = await runSnapload([]);
    expect(r.code).toBe(2);
    expect(r.stdout).toContain("usage:");
  });

  test("unknown command: exit 2 with a message", async () => {
    const r = await runSnapload(["frobnicate"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown command 'frobnicate'");
    expect(r.stderr).toContain("snapload help");
  });

  const sock = () => join(dir.path, "cli.sock");
  test("serve without --socket: exit 2 naming --socket", async () => {
    const r = await runSnapload(["serve", "--mem", raw.path]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--socket");
  });

  test("serve without --mem: exit 2 naming --mem", async () => {
    const r = await runSnapload(["serve", "--socket", sock()]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--mem");
    expect(existsSync(sock())).toBe(false);
  });

  for (const bad of ["0", "513", "two", "-1"]) {
    test(`serve --fault-around ${bad}: exit 2`, async () => {
      const r = await runSnapload(["serve", "--socket", sock(), "--mem", raw.path, "--fault-around", bad]);
      expect(r.code).toBe(2);
      expect(r.stderr).toContain("--fault-around");
      expect(existsSync(sock())).toBe(false);
    });
  }

  test("serve with an unknown option: exit 2", async () => {
    const r = await runSnapload(["serve", "--socket", sock(), "--mem", raw.path, "--prefetch-everything", "yes"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown option --prefetch-everything");
  });

  test("a flag without its value: exit 2", async () => {
    const r = await runSnapload(["serve", "--mem", raw.path, "--socket"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--socket needs a value");
  });

  test("serve with a missing --mem file: a clear error naming the path, no socket", async () => {
    const missing = join(dir.path, "gone", "vm.mem");
    const r = await runSnapload(["serve", "--socket", sock(), "--mem", missing]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain("ENOENT");
    expect(r.stderr).toContain(missing);
    expect(r.stderr).not.toMatch(/^\s+at /m); // one line, no stack trace
    expect(existsSync(sock())).toBe(false);
  });
});
