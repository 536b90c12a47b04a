// The first postcopy restores after start, A/B between checkouts (the JIT warm-up of
// src/daemon/postcopy-warmup.ts): per round and per root, a fresh page server and daemon (bench
// d's placement and flags), then `--restores` restores in a row on that daemon. For each restore:
// the guest's touch time, and the CPU time (from /proc, per thread) of the daemon and of the page
// server, split into JIT compiler threads and the rest.
//   bun bench/postcopy-first-restore.ts --root OLD --root NEW [--mib N] [--rounds N] [--restores N]
// Prints one JSON line per restore, then medians per root and restore number.
import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeRandomImage } from "./common.ts";

const argv = process.argv.slice(2);
const all = (name: string) => argv.flatMap((a, i) => (a === `--${name}` ? [argv[i + 1]!] : []));
const one = (name: string, dflt: string) => all(name)[0] ?? dflt;
const BUN = process.execPath;
const mib = Number(one("mib", "64"));
const rounds = Number(one("rounds", "4"));
const restores = Number(one("restores", "3"));
const dir = join(tmpdir(), `snapload-first-${process.pid}`);
Bun.spawnSync(["mkdir", "-p", dir]);
const token = join(dir, "token");
writeFileSync(token, `${randomBytes(24).toString("base64")}\n`, { mode: 0o600 });
const image = join(dir, "vm.mem");
makeRandomImage(image, mib);
const TICK_MS = 1000 / Number(Bun.spawnSync(["getconf", "CLK_TCK"]).stdout.toString().trim() || "100");

/**
 * CPU ms of a process so far: all threads (/proc/PID/stat: threads that ended included), and per
 * live JSC JIT compiler thread (JITWorker). A JIT thread that ends between two readings takes its
 * time out of `jit` (not out of `total`): the JIT figure is a lower bound.
 */
function cpu(pid: number): { total: number; jit: Map<string, number> } {
  const ms = (stat: string) => {
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) * TICK_MS; // utime, stime: fields 14 and 15
  };
  const jit = new Map<string, number>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
      if (/JIT/.test(stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")")))) jit.set(tid, ms(stat));
    } catch {
      // the thread ended
    }
  }
  return { total: ms(readFileSync(`/proc/${pid}/stat`, "utf8")), jit };
}
function minus(a: ReturnType<typeof cpu>, b: ReturnType<typeof cpu>): { total: number; jit: number } {
  let jit = 0;
  for (const [tid, ms] of a.jit) jit += Math.max(0, ms - (b.jit.get(tid) ?? 0));
  return { total: a.total - b.total, jit };
}

async function waitLine(proc: Bun.Subprocess<"ignore", "pipe", "pipe">, re: RegExp): Promise<RegExpMatchArray> {
  const reader = proc.stderr.getReader();
  let text = "";
  for (;;) {
    const m = text.match(re);
    if (m) {
      void (async () => {
        while (!(await reader.read()).done);
      })();
      return m;
    }
    const { value, done } = await reader.read();
    if (done) throw new Error(`exited before ${re}:\n${text}`);
    text += new TextDecoder().decode(value);
  }
}

const results = new Map<string, number[]>();
const add = (k: string, v: number) => results.set(k, [...(results.get(k) ?? []), v]);
for (let r = 0; r < rounds; r++) {
  for (const root of all("root")) {
    const ps = Bun.spawn(["taskset", "-c", "1", BUN, join(root, "src/main.ts"), "page-server", "--listen", "127.0.0.1:0", "--mem", image, "--token-file", token], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    const port = (await waitLine(ps, /listening on 127\.0\.0\.1:(\d+)/))[1];
    const sock = join(dir, `d${r}.sock`);
    const d = Bun.spawn(
      ["taskset", "-c", "0", BUN, join(root, "src/main.ts"), "serve", "--socket", sock, "--mem", `tcp://127.0.0.1:${port}`, "--token-file", token, "--populate", "background", "--fault-around", "16"],
      { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
    );
    await waitLine(d, /listening on/);
    for (let k = 1; k <= restores; k++) {
      const before = [cpu(d.pid), cpu(ps.pid)];
      const vm = Bun.spawnSync(["taskset", "-c", "0", join(root, "build", "vmm-standin"), "--socket", sock, "--expect", image, "--order", "seq"]);
      const report = JSON.parse(vm.stdout.toString().trim().split("\n").pop()!);
      if (report.mismatches !== 0) throw new Error(`${root}: ${report.mismatches} wrong pages`);
      const dc = minus(cpu(d.pid), before[0]!);
      const sc = minus(cpu(ps.pid), before[1]!);
      const ms = report.touch_ns / 1e6;
      const tag = `${root} restore ${k}`;
      add(`${tag} touch_ms`, ms);
      add(`${tag} daemon_cpu_ms`, dc.total);
      add(`${tag} daemon_jit_ms`, dc.jit);
      add(`${tag} page_server_cpu_ms`, sc.total);
      add(`${tag} page_server_jit_ms`, sc.jit);
      console.log(JSON.stringify({ root, round: r, restore: k, mib, touch_ms: Math.round(ms), daemon_cpu_ms: dc.total, daemon_jit_ms: dc.jit, page_server_cpu_ms: sc.total, page_server_jit_ms: sc.jit }));
    }
    d.kill("SIGTERM");
    ps.kill("SIGTERM");
    await Promise.all([d.exited, ps.exited]);
  }
}
for (const [k, v] of results) {
  const s = [...v].sort((a, b) => a - b);
  console.log(JSON.stringify({ summary: k, median: Math.round(s[Math.floor(s.length / 2)]!), min: Math.round(s[0]!), max: Math.round(s.at(-1)!) }));
}
rmSync(dir, { recursive: true, force: true });
