// The single executable (dist/snapload, `bun build --compile` with the C core embedded), copied
// out of the repository and run from a fresh directory with an environment that points nowhere
// near the repository: it must not need the source tree, build/ or bun at run time.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { generateMappedRam, generateRawImage, type GeneratedMappedRam } from "./gen-mapped-ram.ts";
import { BUN, Daemon, describeRun, ensureBuilt, ROOT, runStandin } from "./harness.ts";

const MIB = 1024 * 1024;
const PAGE = 4096;

let home = ""; // the fresh directory: cwd, HOME and TMPDIR of every run
let exe = "";
let image = "";
let mr: GeneratedMappedRam;
let buildLog = "";
const daemons: Daemon[] = [];

/** Nothing of the repository, of bun or of node_modules on any path. */
function cleanEnv(): Record<string, string> {
  return { PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", HOME: home, TMPDIR: home, LANG: "C" };
}

async function run(args: string[], timeoutMs = 30_000): Promise<{ code: number; stdout: string; stderr: string }> {
  const proc = Bun.spawn(["./snapload", ...args], { cwd: home, env: cleanEnv(), stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const killer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(killer);
  return { code, stdout, stderr };
}

async function serve(args: string[], socket: string): Promise<Daemon> {
  const proc = Bun.spawn(["./snapload", "serve", "--socket", socket, "--log-format", "json", ...args], { cwd: home, env: cleanEnv(), stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const d = new Daemon(proc, socket);
  daemons.push(d);
  await d.waitForEvent("daemon.listening");
  return d;
}

beforeAll(() => {
  ensureBuilt();
  const r = Bun.spawnSync([BUN, join(ROOT, "scripts/build-binary.ts")], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  buildLog = `${r.stdout.toString()}${r.stderr.toString()}`;
  if (r.exitCode !== 0) throw new Error(`scripts/build-binary.ts failed (exit ${r.exitCode}):\n${buildLog}`);
  home = mkdtempSync(join(tmpdir(), "snapload-bin-"));
  expect(home.startsWith(ROOT)).toBe(false);
  exe = join(home, "snapload");
  copyFileSync(join(ROOT, "dist/snapload"), exe);
  image = join(home, "vm.mem");
  generateRawImage(image, 32 * MIB, 17);
  mr = generateMappedRam(join(home, "guest.mapped-ram"), { ramMiB: 8, seed: 2 });
}, 120_000);

afterAll(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  if (home) rmSync(home, { recursive: true, force: true });
}, 15_000);

describe("dist/snapload, away from the repository", () => {
  test("help", async () => {
    expect(existsSync(exe)).toBe(true);
    const r = await run(["help"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain("usage:");
    expect(r.stdout).toContain("snapload serve --socket PATH --mem FILE");
  });

  test("inspect a raw image and a mapped-ram file", async () => {
    const raw = await run(["inspect", "vm.mem", "--json"]);
    expect(raw.code, raw.stderr).toBe(0);
    expect(JSON.parse(raw.stdout)).toMatchObject({ format: "raw", size: 32 * MIB });
    const text = await run(["inspect", mr.path]);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/^format:\s+mapped-ram$/m);
    for (const b of mr.blocks) expect(text.stdout).toContain(b.name);
    const ram = mr.blocks.find((b) => b.name === "pc.ram")!;
    expect(text.stdout).toMatch(new RegExp(`^data pages:\\s+${ram.dataPages} `, "m"));
  });

  test("serve: a stand-in VM restores with every page verified", async () => {
    const d = await serve(["--mem", "vm.mem"], join(home, "h.sock"));
    const r = await runStandin(["--timeout", "10000", "--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.mismatches).toBe(0);
    expect(r.report!.verified).toBe((32 * MIB) / PAGE);
  }, 20_000);

  test("serve a mapped-ram file: pc.ram restores with every page verified", async () => {
    const ram = mr.blocks.find((b) => b.name === "pc.ram")!;
    const d = await serve(["--mem", mr.path], join(home, "mr.sock"));
    const r = await runStandin(["--timeout", "10000", "--socket", d.socket, "--expect", ram.expectFile!, "--order", "random", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.mismatches).toBe(0);
    expect(r.report!.verified).toBe(ram.usedLength / PAGE);
  }, 20_000);

  test("demo --size-mib 32: every page verified (the stand-in comes from inside the binary)", async () => {
    const r = await run(["demo", "--size-mib", "32"], 30_000);
    expect(r.code, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`all ${(32 * MIB) / PAGE} pages verified`));
  }, 40_000);

  test("the demo cleans up its directory", () => {
    const left = readdirSync(home).filter((n) => n.startsWith("snapload-demo-"));
    expect(left).toEqual([]);
  });
});
