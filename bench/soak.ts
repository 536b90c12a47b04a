// Soak (`npm run soak`, not in CI): one daemon serving a local image and a page server's image
// for M minutes while up to N stand-in VMs connect, restore (some with balloons, some verifying
// every page) and exit, hostile peers send bad handshakes, and the page server is killed at
// random and restarted. At the end: wrong pages (must be 0), failed good VMs, and the daemon's
// fd count and RSS over time (must stay flat).
//   bun bench/soak.ts [--minutes M] [--vms N]
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { makeRandomImage, MiB } from "./common.ts";
import { BUN, freePort, HOSTILE_PEER, killAll, MAIN, memStatus, Proc, startSnapload, STANDIN } from "./procs.ts";

const { values } = parseArgs({ options: { minutes: { type: "string", default: "5" }, vms: { type: "string", default: "6" } }, strict: true });
const minutes = Number(values.minutes);
const maxVms = Number(values.vms);
if (!(minutes > 0) || !(maxVms >= 1)) throw new Error("--minutes and --vms must be positive numbers");

const dir = mkdtempSync(join(tmpdir(), "snapload-soak-"));
const img = join(dir, "vm.raw");
makeRandomImage(img, 64);
const token = join(dir, "token");
writeFileSync(token, "soak-secret-0123456789abcdef\n", { mode: 0o600 });
const port = freePort();
const local = join(dir, "local.sock");
const remote = join(dir, "remote.sock");

let pageServer: Proc | undefined;
const startPageServer = () => {
  pageServer = new Proc("page-server", [BUN, MAIN, "page-server", "--listen", `127.0.0.1:${port}`, "--mem", img, "--token-file", token, "--log-format", "json"]);
};
startPageServer();
await pageServer!.waitFor(/"event":"page_server\.listening"/, "stderr", 30_000);
const daemon = await startSnapload(local, ["--socket", remote, "--mem", img, "--mem", `tcp://127.0.0.1:${port}`, "--token-file", token, "--page-server-deadline", "60000"], undefined);

const stats = { good: 0, goodFailed: 0, wrongPages: 0, hostile: 0, hostileServed: 0, pageServerKills: 0 };
const samples: { t: number; fds: number; rssKiB: number }[] = [];
const failures: string[] = [];
const sample = () => {
  const m = memStatus(daemon.pid);
  samples.push({ t: Date.now(), fds: readdirSync(`/proc/${daemon.pid}/fd`).length, rssKiB: m?.VmRSS ?? 0 });
};

let seq = 0;
async function oneVm(): Promise<void> {
  const n = seq++;
  const kind = n % 5;
  const region = `${8 * MiB}@${(n % 8) * 8 * MiB}`;
  if (kind === 4) {
    // Hostile: a handshake the daemon must refuse, then gone.
    const bad = [["--fds", "many"], ["--garbage", "70000"], ["--fds", "notuffd"], ["--silent", "--reject-timeout", "8000"]][n % 4]!;
    const p = new Proc("hostile", [HOSTILE_PEER, "--socket", local, ...bad]);
    const code = await p.wait(30_000);
    stats.hostile++;
    if (code !== 3) stats.hostileServed++;
    return;
  }
  const sock = kind === 3 ? remote : local;
  const extra = kind === 1 ? ["--balloon", "0:1m", "--balloon-after", "2m:1m"] : kind === 2 ? ["--order", "random", "--seed", String(n)] : [];
  const p = new Proc("vm", [STANDIN, "--socket", sock, "--expect", img, "--region", region, "--verify", "all", "--timeout", "90000", ...extra]);
  const code = await p.wait(120_000);
  stats.good++;
  const line = p.stdout.trim().split("\n").pop() ?? "";
  const report = line.startsWith("{") ? (JSON.parse(line) as { mismatches: number }) : undefined;
  if (report) stats.wrongPages += report.mismatches;
  if (code !== 0) {
    stats.goodFailed++;
    if (failures.length < 5) failures.push(`${sock === remote ? "remote" : "local"} VM ${n}: ${p.describeExit()}: ${p.tail()}`);
  }
}

const until = Date.now() + minutes * 60_000;
const running = new Set<Promise<void>>();
let nextKill = Date.now() + 5000 + Math.random() * 10_000;
sample();
let lastSample = Date.now();
while (Date.now() < until) {
  while (running.size < maxVms) {
    const p: Promise<void> = oneVm().finally(() => running.delete(p));
    running.add(p);
  }
  await Promise.race([...running, Bun.sleep(250)]);
  if (Date.now() >= nextKill) {
    // Kill the page server; bring it back a little later. Remote VMs wait, then carry on.
    pageServer!.kill("SIGKILL");
    await pageServer!.exited;
    stats.pageServerKills++;
    await Bun.sleep(500 + Math.random() * 2000);
    startPageServer();
    nextKill = Date.now() + 5000 + Math.random() * 10_000;
  }
  if (Date.now() - lastSample >= 5000) {
    sample();
    lastSample = Date.now();
  }
}
await Promise.all(running);
// Every VM that connected has exited or failed: the daemon logs that once it closed the VM's fds.
const count = (names: string[]) => daemon.stderr.split("\n").filter((l) => l.startsWith("{") && names.includes((JSON.parse(l) as { event: string }).event)).length;
for (const deadline = Date.now() + 10_000; count(["vm.exited", "vm.failed"]) < count(["vm.connected"]); await Bun.sleep(25)) {
  if (Date.now() > deadline) {
    failures.push(`${count(["vm.connected"]) - count(["vm.exited", "vm.failed"])} VM(s) still connected 10 s after the last stand-in ended`);
    break;
  }
}
sample();
daemon.kill("SIGTERM");
await daemon.exited;
pageServer!.kill("SIGTERM");
killAll();
rmSync(dir, { recursive: true, force: true });

// Flat: the last samples against the first ones after warm-up (the first VM opens lazy fds).
const early = samples.slice(1, 4);
const late = samples.slice(-3);
const fdsGrowth = Math.max(...late.map((s) => s.fds)) - Math.max(...early.map((s) => s.fds));
const rssGrowthKiB = Math.min(...late.map((s) => s.rssKiB)) - Math.min(...early.map((s) => s.rssKiB));
const report = { minutes, maxVms, ...stats, fdsFirst: samples[0]!.fds, fdsGrowth, rssFirstKiB: samples[0]!.rssKiB, rssGrowthKiB, samples: samples.length, failures };
console.log(JSON.stringify(report, null, 2));
const ok = stats.wrongPages === 0 && stats.goodFailed === 0 && stats.hostileServed === 0 && fdsGrowth <= 2;
console.log(ok ? "soak: OK" : "soak: FAILED");
process.exit(ok ? 0 : 1);
