// Issue 8, attack 2: peers that send 64 KB of a never-complete handshake ("[1,1,1,…") and then
// drip one byte per millisecond must not stall the single loop that serves every VM's faults.
// The review measured a restore going from 0.05 s to 7.15 s with four such peers (each dripped
// byte rescanned the whole buffer). Here the same restore runs with and without the attack, and
// its touch time under attack must stay within 2x (a ratio the issue asks for; medians of five, quiet and attacked runs alternating).
//
// SNAPLOAD_DRIP_ROOT=/path/to/another/checkout runs that checkout's daemon instead (to measure
// the "before" figure against an older tree with the same attack).
import { afterAll, beforeAll, expect, test } from "bun:test";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { BUN, Daemon, describeRun, ensureBuilt, ROOT, runStandin, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
const ATTACKERS = 4;
const PREFIX_BYTES = 64_000;
const RUNS = 5;
const DAEMON_ROOT = process.env.SNAPLOAD_DRIP_ROOT ?? ROOT;
/** Our own daemon logs JSON events; another checkout's may predate them (its log is only read here for ours). */
const OURS = DAEMON_ROOT === ROOT;

let dir: ReturnType<typeof tempDir>;
let image: string;
let socket: string;
let daemon: Daemon;

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 16 * MIB, 11);
  socket = join(dir.path, "drip.sock");
  const proc = Bun.spawn(
    [BUN, join(DAEMON_ROOT, "src/main.ts"), "serve", "--socket", socket, "--mem", image, "--fault-around", "1", "--spin-us", "0", ...(OURS ? ["--log-format", "json"] : [])],
    { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
  );
  daemon = new Daemon(proc, socket);
  if (OURS) await daemon.waitForEvent("daemon.listening");
  else await daemon.waitForLog(/listening on/);
});

afterAll(async () => {
  await daemon?.stop();
  dir?.cleanup();
});

/** One restore of the whole image, one page per fault in random order: its touch time in ms. */
async function restoreMs(seed: number): Promise<number> {
  const r = await runStandin(["--socket", socket, "--expect", image, "--order", "random", "--seed", String(seed), "--verify", "all"]);
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBe((16 * MIB) / 4096);
  return r.report!.touch_ns / 1e6;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

interface Attacker {
  stop(): Promise<{ connects: number; dropped: number; prefixes: number; dripped: number }>;
}

/** Starts the hostile peers; resolves once every one of them has sent its 64 KB prefix. */
async function startAttack(): Promise<Attacker> {
  const proc = Bun.spawn([BUN, join(import.meta.dir, "drip-attacker.ts"), socket, String(ATTACKERS), String(PREFIX_BYTES)], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "inherit",
  });
  const lines = proc.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  const readUntil = async (re: RegExp) => {
    while (!re.test(out)) {
      const { value, done } = await lines.read();
      if (done) throw new Error(`attacker exited early (${await proc.exited}): ${out}`);
      out += value;
    }
  };
  await readUntil(/ready\n/);
  return {
    async stop() {
      proc.kill("SIGTERM");
      await readUntil(/\{.*\}\n/);
      await proc.exited;
      return JSON.parse(out.match(/\{.*\}/)![0]);
    },
  };
}

test(`a restore under a drip attack by ${ATTACKERS} peers stays within 2x of the same restore without it`, async () => {
  await restoreMs(100); // warm-up: JIT, page cache
  // Quiet and attacked restores alternate, so a change in the shared machine's load hits both.
  const quiet: number[] = [];
  const attacked: number[] = [];
  let dripped = 0;
  let prefixes = 0;
  for (let i = 0; i < RUNS; i++) {
    quiet.push(await restoreMs(1 + i));
    const attack = await startAttack();
    try {
      attacked.push(await restoreMs(1 + i));
    } finally {
      const stats = await attack.stop();
      dripped += stats.dripped;
      prefixes += stats.prefixes;
    }
  }
  const ratio = median(attacked) / median(quiet);
  console.log(
    `drip attack (${ATTACKERS} peers, ${PREFIX_BYTES} B prefix, 1 B/ms): touch time median ${median(quiet).toFixed(1)} ms quiet ` +
      `[${quiet.map((x) => x.toFixed(1)).join(", ")}], ${median(attacked).toFixed(1)} ms attacked [${attacked.map((x) => x.toFixed(1)).join(", ")}] = ${ratio.toFixed(2)}x; ` +
      `${prefixes} prefixes sent, ${dripped} bytes dripped`,
  );
  // The attack really ran: every peer sent its prefix and dripped bytes during each restore.
  expect(prefixes).toBeGreaterThanOrEqual(ATTACKERS * RUNS);
  expect(dripped).toBeGreaterThan(ATTACKERS * RUNS * 10);
  expect(ratio).toBeLessThanOrEqual(2);
  if (OURS) {
    // The per-connection read budget drops a dripping peer long before its handshake timeout.
    const dropped = daemon.events().filter((e) => e.event === "peer.rejected" && e.code === "BAD_HANDSHAKE" && typeof e.reads === "number");
    expect(dropped.length, daemon.log).toBeGreaterThanOrEqual(1);
  }
}, 120_000);
