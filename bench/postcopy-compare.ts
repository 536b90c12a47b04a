// Before/after figures for the postcopy hardening, one run, two snapload checkouts side by side:
//   bun bench/postcopy-compare.ts throughput --root OLD --root NEW [--mib N] [--rounds N] [--no-raw]
//     A whole restore through `page-server` → `serve --mem tcp://` → the VMM stand-in touching
//     every page in order (sequential faults + background completion); MiB/s = image / touch time.
//   bun bench/postcopy-compare.ts latency --root OLD --root NEW [--mib N] [--rounds N] [--populate background|none]
//     Fault latency p50/p99 (one page per fault, a random quarter of the image) while background
//     completion runs, beside the same touches from the local file (issue 10, target 5).
//   bun bench/postcopy-compare.ts flood --root DIR [--conns N] [--addrs A] [--clients N]
//     The page server under `prlimit --nofile=1024`, N idle connections that reconnect when dropped
//     (test/flood.ts; A source addresses, 0 = the legitimate client's own 127.0.0.1), then N
//     legitimate clients one after another (HELLO→CHALLENGE→AUTH→WELCOME, 5 s each, protocol 1
//     or 2, whichever the server speaks); reports their times, timeouts, and the log's size.
// Prints one JSON line per measurement. ROOT is a checkout with build/ and node_modules/.
// It reads the daemons' text logs on purpose: the OLD checkouts it compares predate --log-format json.
import { createHmac, randomBytes } from "node:crypto";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { createConnection } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { makeRandomImage } from "./common.ts";
import { clientProof } from "../src/postcopy/auth.ts";
import { decodeChallenge, encodeHello, FrameType, frame, HEADER_SIZE, Role } from "../src/postcopy/protocol.ts";

const argv = process.argv.slice(2);
const mode = argv[0];
const all = (name: string) => argv.flatMap((a, i) => (a === `--${name}` ? [argv[i + 1]!] : []));
const one = (name: string, dflt: string) => all(name)[0] ?? dflt;
const BUN = process.execPath;
const STANDIN = join(import.meta.dir, "..", "build", "vmm-standin");
const dir = join(tmpdir(), `snapload-compare-${process.pid}`);
Bun.spawnSync(["mkdir", "-p", dir]);
const token = join(dir, "token");
const tokenText = randomBytes(24).toString("base64");
writeFileSync(token, `${tokenText}\n`, { mode: 0o600 });
const tokenBytes = Buffer.from(tokenText);

async function waitLine(proc: Bun.Subprocess<"ignore", "pipe", "pipe">, re: RegExp, log: { text: string }): Promise<RegExpMatchArray> {
  const reader = proc.stderr.getReader();
  for (;;) {
    const m = log.text.match(re);
    if (m) {
      void (async () => {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          log.text += new TextDecoder().decode(value);
        }
      })();
      return m;
    }
    const { value, done } = await reader.read();
    if (done) throw new Error(`exited before ${re}:\n${log.text}`);
    log.text += new TextDecoder().decode(value);
  }
}

function pageServer(root: string, image: string, limited: boolean, cpu?: number) {
  const cmd = [...(cpu === undefined ? [] : ["taskset", "-c", String(cpu)]), BUN, join(root, "src/main.ts"), "page-server", "--listen", "127.0.0.1:0", "--mem", image, "--token-file", token];
  const proc = Bun.spawn(limited ? ["prlimit", "--nofile=1024", "--", ...cmd] : cmd, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  return { proc, log: { text: "" } };
}

const REMOTE_CPU = 1;
const TICK_MS = 1000 / Number(Bun.spawnSync(["getconf", "CLK_TCK"]).stdout.toString().trim() || "100");

/** A process's CPU time so far (user + system, all threads), from /proc. */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) * TICK_MS; // utime, stime: fields 14 and 15
}

/** bench/tcp-raw.ts: receiver on CPU 0, sender on CPU 1; ms from accept to the last byte, and each side's CPU ms after start-up. */
async function rawTcp(image: string, bytes: number, aead: boolean): Promise<{ ms: number; recvCpu: number; sendCpu: number }> {
  const script = join(import.meta.dir, "tcp-raw.ts");
  const extra = aead ? ["--aead"] : [];
  const recv = Bun.spawn(["taskset", "-c", "0", BUN, script, "recv", "--bytes", String(bytes), ...extra], { stdin: "ignore", stdout: "pipe", stderr: "inherit" });
  const reader = recv.stdout.getReader();
  let text = "";
  while (!/^port \d+$/m.test(text)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`tcp-raw recv: ${text}`);
    text += new TextDecoder().decode(value);
  }
  const port = text.match(/^port (\d+)$/m)![1]!;
  const recvStart = cpuMs(recv.pid);
  const send = Bun.spawn(["taskset", "-c", String(REMOTE_CPU), BUN, script, "send", "--port", port, "--file", image, ...extra], { stdin: "ignore", stdout: "ignore", stderr: "inherit" });
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += new TextDecoder().decode(value);
  }
  await Promise.all([recv.exited, send.exited]);
  const line = text.trim().split("\n").pop()!;
  const total = (p: Bun.Subprocess) => Number(p.resourceUsage()?.cpuTime.total ?? 0) / 1000;
  // The sender's start-up (reading the file, loading Bun) is in its figure: an upper bound.
  return { ms: (JSON.parse(line) as { ns: number }).ns / 1e6, recvCpu: Math.round(total(recv) - recvStart), sendCpu: Math.round(total(send)) };
}

if (mode === "throughput") {
  // Bench d's placement and flags: daemon and guest on CPU 0, the page server (and raw senders) on
  // CPU 1, `--populate background --fault-around 16`, the guest touching every page in order.
  // Each round runs every root, then the raw loopback TCP ceilings (plain and AES-256-GCM sealed).
  const mib = Number(one("mib", "256"));
  const rounds = Number(one("rounds", "3"));
  const image = join(dir, "vm.mem");
  makeRandomImage(image, mib); // as bench d: every page is data
  const results = new Map<string, number[]>();
  const add = (k: string, ms: number) => results.set(k, [...(results.get(k) ?? []), ms]);
  for (let r = 0; r < rounds; r++) {
    for (const root of all("root")) {
      const ps = pageServer(root, image, false, REMOTE_CPU);
      const port = (await waitLine(ps.proc, /listening on 127\.0\.0\.1:(\d+)/, ps.log))[1];
      const sock = join(dir, `d${r}.sock`);
      const d = Bun.spawn(
        ["taskset", "-c", "0", BUN, join(root, "src/main.ts"), "serve", "--socket", sock, "--mem", `tcp://127.0.0.1:${port}`, "--token-file", token, "--populate", "background", "--fault-around", "16"],
        { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
      );
      const dlog = { text: "" };
      await waitLine(d, /listening on/, dlog);
      const before = [cpuMs(d.pid), cpuMs(ps.proc.pid)];
      const vm = Bun.spawnSync(["taskset", "-c", "0", STANDIN, "--socket", sock, "--expect", image, "--order", "seq"]);
      const report = JSON.parse(vm.stdout.toString().trim().split("\n").pop()!);
      // CPU time of the restore itself (not start-up and warm-up): on a shared machine wall time
      // swings with the neighbours, CPU time much less.
      const daemonCpu = cpuMs(d.pid) - before[0]!;
      const serverCpu = cpuMs(ps.proc.pid) - before[1]!;
      d.kill("SIGTERM");
      ps.proc.kill("SIGTERM");
      await Promise.all([d.exited, ps.proc.exited]);
      const tampered = /tampered|failed authentication/.test(dlog.text + ps.log.text);
      if (report.mismatches !== 0 || tampered) throw new Error(`${root}: ${report.mismatches} wrong pages, tampered=${tampered}\n${dlog.text}\n${ps.log.text}`);
      const ms = report.touch_ns / 1e6;
      add(root, ms);
      add(`${root} daemon cpu`, daemonCpu);
      add(`${root} page-server cpu`, serverCpu);
      console.log(JSON.stringify({ root, round: r, mib, touch_ms: Math.round(ms), mib_per_s: Math.round(mib / (ms / 1e3)), daemon_cpu_ms: daemonCpu, page_server_cpu_ms: serverCpu }));
    }
    if (!argv.includes("--no-raw")) {
      for (const aead of [false, true]) {
        const { ms, recvCpu, sendCpu } = await rawTcp(image, mib * 1024 * 1024, aead);
        const k = aead ? "raw tcp + aes-256-gcm" : "raw tcp";
        add(k, ms);
        add(`${k} receiver cpu`, recvCpu);
        console.log(JSON.stringify({ raw: aead ? "tcp+aes-256-gcm" : "tcp", round: r, mib, ms: Math.round(ms), mib_per_s: Math.round(mib / (ms / 1e3)), receiver_cpu_ms: recvCpu, sender_cpu_ms: sendCpu }));
      }
    }
  }
  for (const [k, v] of results) {
    const s = [...v].sort((a, b) => a - b);
    console.log(JSON.stringify({ summary: k, median_ms: Math.round(s[Math.floor(s.length / 2)]!), min_ms: Math.round(s[0]!), max_ms: Math.round(s.at(-1)!), mib_per_s: Math.round(mib / (s[Math.floor(s.length / 2)]! / 1e3)) }));
  }
  rmSync(dir, { recursive: true, force: true }); // the image is as big as --mib
} else if (mode === "latency") {
  // Fault latency with the background stream running (issue 10, target 5): bench d's placement,
  // the guest touching a random quarter of the image one page per fault while `--populate
  // background` pulls the rest; against the same touches served from the local file. Each round
  // runs the local file, then every root. p50/p99 of the guest's touch latency (a touch whose page
  // the background already installed is not a fault: the p99 is the faults that waited).
  const mib = Number(one("mib", "64"));
  const rounds = Number(one("rounds", "3"));
  const populate = one("populate", "background");
  const image = join(dir, "vm.mem");
  makeRandomImage(image, mib);
  const guest = ["--order", "random", "--seed", "3", "--fraction", "0.25"];
  const results = new Map<string, number[]>();
  const add = (k: string, v: number) => results.set(k, [...(results.get(k) ?? []), v]);
  const touch = async (root: string, mem: string, extra: string[], label: string): Promise<void> => {
    const sock = join(dir, `l${process.hrtime.bigint()}.sock`);
    const d = Bun.spawn(["taskset", "-c", "0", BUN, join(root, "src/main.ts"), "serve", "--socket", sock, "--mem", mem, "--fault-around", "1", ...extra], {
      stdin: "ignore", stdout: "pipe", stderr: "pipe",
    });
    const dlog = { text: "" };
    await waitLine(d, /listening on/, dlog);
    const vm = Bun.spawnSync(["taskset", "-c", "0", STANDIN, "--socket", sock, "--expect", image, ...guest]);
    const report = JSON.parse(vm.stdout.toString().trim().split("\n").pop()!);
    d.kill("SIGTERM");
    await d.exited;
    await Bun.sleep(50); // the log's tail
    const tampered = /tampered|failed authentication/.test(dlog.text);
    if (report.mismatches !== 0 || tampered) throw new Error(`${label}: ${report.mismatches} wrong pages, tampered=${tampered}\n${dlog.text}`);
    add(`${label} p50`, report.lat_p50_ns / 1e3);
    add(`${label} p99`, report.lat_p99_ns / 1e3);
    console.log(JSON.stringify({ label, round: r, p50_us: Math.round(report.lat_p50_ns / 1e3), p99_us: Math.round(report.lat_p99_ns / 1e3) }));
  };
  let r = 0;
  for (; r < rounds; r++) {
    await touch(all("root")[0]!, image, [], "local");
    for (const root of all("root")) {
      const ps = pageServer(root, image, false, REMOTE_CPU);
      const port = (await waitLine(ps.proc, /listening on 127\.0\.0\.1:(\d+)/, ps.log))[1];
      await touch(root, `tcp://127.0.0.1:${port}`, ["--token-file", token, "--populate", populate], root);
      ps.proc.kill("SIGTERM");
      await ps.proc.exited;
      if (/tampered|failed authentication/.test(ps.log.text)) throw new Error(`${root}: page server logged a failed authentication\n${ps.log.text}`);
    }
  }
  for (const [k, v] of results) {
    const s = [...v].sort((a, b) => a - b);
    console.log(JSON.stringify({ summary: k, median_us: Math.round(s[Math.floor(s.length / 2)]!), min_us: Math.round(s[0]!), max_us: Math.round(s.at(-1)!) }));
  }
  rmSync(dir, { recursive: true, force: true });
} else if (mode === "flood") {
  const root = one("root", join(import.meta.dir, ".."));
  const conns = one("conns", "3000");
  const addrs = one("addrs", "0");
  const clients = Number(one("clients", "6"));
  const image = join(dir, "small.mem");
  writeDemoImage(image, 16 * 1024 * 1024, 3);
  const ps = pageServer(root, image, true);
  const port = Number((await waitLine(ps.proc, /listening on 127\.0\.0\.1:(\d+)/, ps.log))[1]);
  const flooder = Bun.spawn([BUN, join(import.meta.dir, "..", "test/flood.ts"), String(port), conns, addrs], { stdout: "ignore", stderr: "inherit" });
  await Bun.sleep(3000); // the flood at full strength (and past a 2 s TCP_DEFER_ACCEPT)
  const linesBefore = ps.log.text.split("\n").length;
  const times: (number | "timeout")[] = [];
  for (let i = 0; i < clients; i++) times.push(await legit(port));
  await Bun.sleep(1000);
  const during = ps.log.text.split("\n").length - linesBefore;
  flooder.kill();
  ps.proc.kill("SIGTERM");
  await ps.proc.exited;
  const log = ps.log.text;
  console.log(JSON.stringify({
    root, conns: Number(conns), addrs: Number(addrs), clients,
    authenticated: times.filter((t) => t !== "timeout").length,
    times_ms: times.map((t) => (t === "timeout" ? t : Math.round(t))),
    log_lines_during_clients: during,
    log_lines: log.split("\n").length,
    emfile_lines: (log.match(/EMFILE/g) ?? []).length,
    handshake_timeout_lines: (log.match(/no authentication within/g) ?? []).length,
    suppressed_summaries: (log.match(/lines suppressed/g) ?? []).length,
    totals: log.match(/page server: .*accept errors/)?.[0],
  }));
  process.exit(0);
}

/** One legitimate client: ms from connect to WELCOME, or "timeout" after 5 s. Speaks v1 or v2. */
function legit(port: number): Promise<number | "timeout"> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const s = createConnection({ host: "127.0.0.1", port });
    const done = (r: number | "timeout") => {
      clearTimeout(timer);
      s.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => done("timeout"), 5000);
    s.on("error", () => {});
    const hello = encodeHello({ versionMin: 1, versionMax: 2, role: Role.URGENT, flags: 0, nonce: new Uint8Array(randomBytes(32)) });
    s.write(frame(FrameType.HELLO, hello));
    let buf = Buffer.alloc(0);
    s.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= HEADER_SIZE) {
        const len = buf.readUInt32LE(4);
        if (buf.length < HEADER_SIZE + len) return;
        const type = buf[0];
        const payload = new Uint8Array(buf.subarray(HEADER_SIZE, HEADER_SIZE + len));
        buf = buf.subarray(HEADER_SIZE + len);
        if (type === FrameType.CHALLENGE) {
          const c = decodeChallenge(payload);
          const proof = c.version === 1
            ? new Uint8Array(createHmac("sha256", tokenBytes).update("snapload-postcopy-v1 client proof").update(c.nonce).update(hello.subarray(16, 48)).digest())
            : clientProof(tokenBytes, { hello, challenge: payload });
          s.write(frame(FrameType.AUTH, proof));
        } else if (type === FrameType.WELCOME) {
          return done(performance.now() - t0);
        } else {
          return done("timeout");
        }
      }
    });
  });
}
