// Fault-around, working sets (record → prefetch), background population and detach.
// These check behaviour and contents; how fast they are is the benchmark suite's business.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { prng } from "../src/core/prng.ts";
import { decodeWorkingSet, encodeWorkingSet } from "../src/index.ts";
import { type Daemon, describeRun, ensureBuilt, runStandin, STANDIN, startDaemon, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
const PAGES = (32 * MIB) / 4096;
let dir: ReturnType<typeof tempDir>;
let image: string;

beforeAll(() => {
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 32 * MIB, 11);
});
afterAll(() => dir?.cleanup());

/** Pages and faults of the daemon's VM exit (its only VM; the daemon logs JSON). */
async function vmExit(d: Daemon): Promise<{ pages: number; faults: number }> {
  const e = await d.waitForEvent("vm.exited");
  return { pages: e.pages as number, faults: e.faults as number };
}

function orderFile(name: string, pages: number[]): string {
  const path = join(dir.path, name);
  writeFileSync(path, new Uint8Array(Uint32Array.from(pages).buffer));
  return path;
}

/** A deterministic random subset of page indexes, in random order. */
function randomPages(count: number, seed: number): number[] {
  const all = Array.from({ length: PAGES }, (_, i) => i);
  const rnd = prng(seed);
  for (let i = all.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [all[i], all[j]] = [all[j]!, all[i]!];
  }
  return all.slice(0, count);
}

describe("fault-around", () => {
  test("--fault-around 16 serves a sequential restore in about 1/16 of the faults", async () => {
    const sock = join(dir.path, "fa.sock");
    const d = await startDaemon(["--mem", image, "--fault-around", "16", "--log-format", "json"], sock);
    const r = await runStandin(["--socket", sock, "--expect", image, "--order", "seq", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.verified).toBe(PAGES);
    const { faults } = await vmExit(d);
    expect(faults).toBeLessThanOrEqual(PAGES / 16 + 64);
    expect(faults).toBeGreaterThan(0);
    await d.stop();
  });

  test("--fault-around 1 is one page per fault", async () => {
    const sock = join(dir.path, "fa1.sock");
    const d = await startDaemon(["--mem", image, "--fault-around", "1", "--log-format", "json"], sock);
    const r = await runStandin(["--socket", sock, "--expect", image, "--order", "random", "--fraction", "0.25"]);
    expect(r.code, describeRun(r)).toBe(0);
    const { pages, faults } = await vmExit(d);
    expect(pages).toBe(r.report!.pages);
    expect(faults).toBe(r.report!.pages);
    await d.stop();
  });

  test("--spin-us 0 (never busy-poll) and --spin-us 500 both serve every page correctly", async () => {
    for (const spin of ["0", "500"]) {
      const sock = join(dir.path, `spin${spin}.sock`);
      const d = await startDaemon(["--mem", image, "--spin-us", spin], sock);
      try {
        const r = await runStandin(["--socket", sock, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
        expect(r.code, describeRun(r)).toBe(0);
        expect(r.report!.verified).toBe(PAGES);
      } finally {
        await d.stop();
      }
    }
  });

  test("fault-around never overwrites pages the guest discarded", async () => {
    const sock = join(dir.path, "fab.sock");
    const d = await startDaemon(["--mem", image, "--fault-around", "64"], sock);
    const r = await runStandin(["--socket", sock, "--expect", image, "--balloon", "1m:1m", "--order", "random", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    await d.stop();
  });
});

describe("detach races", () => {
  test("a fault racing the unregister is woken, never left asleep (40 restores that detach mid-touch)", async () => {
    // Balloon first (those pages settle as removed), then 2 MiB windows: the table completes, and
    // the VM detaches, while the guest still faults — on the removed pages among others. Before the
    // fix about one restore in ten left a vCPU asleep forever (the stand-in's watchdog fired).
    const sock = join(dir.path, "race.sock");
    const d = await startDaemon(["--mem", image, "--fault-around", "512", "--log-format", "json"], sock);
    try {
      for (let seed = 1; seed <= 40; seed++) {
        const r = await runStandin(["--timeout", "4000", "--socket", sock, "--expect", image, "--region", "8m@0", "--balloon", "0:1m", "--order", "random", "--seed", String(seed), "--threads", "2", "--verify", "all"]);
        expect(r.code, `seed ${seed}: ${describeRun(r)}`).toBe(0);
      }
      expect(d.events().filter((e) => e.event === "vm.detached").length).toBeGreaterThanOrEqual(40);
    } finally {
      await d.stop();
    }
  });
});

describe("working sets", () => {
  test("record, then prefetch: the same pages, far fewer faults, every page correct", async () => {
    const subset = randomPages(PAGES / 10, 5);
    const order = orderFile("ws.order", subset);
    const ws = join(dir.path, "vm.ws");
    const sock = join(dir.path, "rec.sock");
    const rec = await startDaemon(["--mem", image, "--record", ws, "--log-format", "json"], sock);
    const r1 = await runStandin(["--socket", sock, "--expect", image, "--order", `file:${order}`]);
    expect(r1.code, describeRun(r1)).toBe(0);
    expect((await rec.waitForEvent("vm.recorded")).pages).toBe(subset.length);
    await rec.stop();
    const recorded = decodeWorkingSet(readFileSync(ws), 32 * MIB);
    expect([...recorded]).toEqual(subset);

    const sock2 = join(dir.path, "pf.sock");
    const pf = await startDaemon(["--mem", image, "--prefetch", ws, "--log-format", "json"], sock2);
    expect((await pf.waitForEvent("daemon.listening")).prefetchPages).toBe(subset.length);
    // The guest touches the same set in another order, and verifies every page it touched.
    const reordered = orderFile("ws2.order", [...subset].reverse());
    const r2 = await runStandin(["--socket", sock2, "--expect", image, "--order", `file:${reordered}`]);
    expect(r2.code, describeRun(r2)).toBe(0);
    expect(r2.report!.verified).toBe(subset.length);
    const { faults } = await vmExit(pf);
    // Prefetch races the guest from the handshake on; most touches must find their page installed.
    expect(faults).toBeLessThan(subset.length / 2);
    await pf.stop();
  });

  test("SIGUSR1 writes the recording of a running VM", async () => {
    const ws = join(dir.path, "usr1-{vm}.ws");
    const sock = join(dir.path, "usr1.sock");
    const d = await startDaemon(["--mem", image, "--record", ws, "--log-format", "json"], sock);
    // The stand-in prints its report once it touched its pages, then holds the VM connected.
    const standin = Bun.spawn([STANDIN, "--socket", sock, "--expect", image, "--order", "seq", "--fraction", "0.1", "--hold", "60000"], { stdout: "pipe", stderr: "pipe" });
    const reader = standin.stdout.getReader();
    let out = "";
    while (!out.includes("}\n")) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`stand-in exited without a report: ${out}`);
      out += new TextDecoder().decode(value);
    }
    d.proc.kill("SIGUSR1");
    const e = await d.waitForEvent("vm.recorded");
    expect(e).toMatchObject({ vm: 1, pid: standin.pid, path: join(dir.path, "usr1-1.ws") });
    const path = join(dir.path, "usr1-1.ws");
    expect(existsSync(path)).toBe(true);
    const recorded = decodeWorkingSet(readFileSync(path), 32 * MIB);
    expect(recorded.length).toBe(Math.ceil(PAGES * 0.1));
    expect(recorded[0]).toBe(0);
    expect(e.pages).toBe(recorded.length);
    standin.kill("SIGKILL");
    await d.stop();
  });

  test("a missing or corrupt working-set file is refused at start", async () => {
    const good = encodeWorkingSet(Uint32Array.from([1, 2, 3]), 32 * MIB);
    const corrupt = good.slice();
    corrupt[30] = (corrupt[30] ?? 0) ^ 0xff;
    const beyond = encodeWorkingSet(Uint32Array.from([PAGES + 5]), 32 * MIB);
    const otherImage = encodeWorkingSet(Uint32Array.from([1]), 64 * MIB);
    const cases: [string, Uint8Array | null, RegExp][] = [
      ["missing.ws", null, /not found/],
      ["corrupt.ws", corrupt, /checksum mismatch/],
      ["beyond.ws", beyond, /beyond the image/],
      ["other.ws", otherImage, /recorded from an image of/],
      ["garbage.ws", new TextEncoder().encode("definitely not a working set file"), /bad magic/],
    ];
    for (const [name, bytes, pattern] of cases) {
      const path = join(dir.path, name);
      if (bytes) writeFileSync(path, bytes);
      const proc = Bun.spawn([process.execPath, join(import.meta.dir, "../src/main.ts"), "serve", "--socket", join(dir.path, "x.sock"), "--mem", image, "--prefetch", path], {
        stderr: "pipe",
      });
      const err = await new Response(proc.stderr).text();
      expect(await proc.exited, name).toBe(2);
      expect(err, name).toMatch(pattern);
    }
  });
});

describe("background population", () => {
  test("a VM that touches 1% is fully populated, then detached; every page correct", async () => {
    const sock = join(dir.path, "pop.sock");
    const d = await startDaemon(["--mem", image, "--populate", "background", "--log-format", "json"], sock);
    const r = await runStandin(["--socket", sock, "--expect", image, "--order", "random", "--fraction", "0.01", "--pause", "1500", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.report!.verified).toBe(PAGES);
    await d.waitForEvent("vm.detached");
    const { faults } = await vmExit(d);
    // Verification touched every page after the pause: served by the populator, not by faults.
    expect(faults).toBeLessThan(PAGES / 2);
    await d.stop();
  });

  test("population skips pages the guest discarded (they stay zero)", async () => {
    const sock = join(dir.path, "popb.sock");
    const d = await startDaemon(["--mem", image, "--populate", "background", "--log-format", "json"], sock);
    const r = await runStandin(["--socket", sock, "--expect", image, "--balloon", "4m:8m", "--fraction", "0.01", "--pause", "1500", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    await d.waitForEvent("vm.detached");
    await d.stop();
  });
});
