// d. Postcopy: pages fetched over TCP from `snapload page-server` instead of a local file.
// Fault latency p50/p99 (one page per fault, random order over a quarter of the image) vs the
// same from the local file, on demand only and while background completion runs (issue 10,
// target 5: p99 ≤ 3x the local file's); background completion throughput (`--populate background`, the guest
// touching every page in order; bytes / touch_ns) vs a raw loopback TCP transfer of the same bytes,
// plain (Bun's sockets; the C core's, received into one buffer) and sealed with AES-256-GCM in
// 128 KiB records opened in place (the crypto ceiling: postcopy frames are sealed); and the install
// floor: the same image installed by the plain-C handler's 2 MiB UFFDIO_COPYs from memory, no network.
// Receive, decrypt and install all run on the guest's CPU, so their times add up: the ceiling of
// background completion here is 1 / (1/rate(TCP + AES-GCM) + 1/rate(install)).
// Placement: daemon and guest on CPU 0; the page server (the "remote host") and the raw sender on CPU 1.
import { chmodSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { check, type Ctx, fmtRate, fmtTime, MiB, type Row, type Scenario, summarize } from "../common.ts";
import { BenchError, BUN, freePort, MAIN, pinned, Proc } from "../procs.ts";
import { type Placement, plainRun, SAME_CPU, snaploadRun, warmUp } from "../runs.ts";

const REMOTE_CPU = 1;
/** Fault latency p99 while the background stream runs, at most this many times the local file's. */
const BUSY_P99_TARGET = 3;

/** The page server's shared secret (both sides read it with --token-file), mode 0600. */
function tokenFile(ctx: Ctx): string {
  const path = join(ctx.dir, "page-server.token");
  writeFileSync(path, `${randomBytes(32).toString("base64")}\n`, { mode: 0o600 });
  chmodSync(path, 0o600);
  return path;
}

async function withPageServer<T>(img: string, token: string, fn: (url: string) => Promise<T>): Promise<T> {
  const port = freePort();
  const ps = new Proc(
    "snapload page-server",
    pinned(REMOTE_CPU, [BUN, MAIN, "page-server", "--listen", `127.0.0.1:${port}`, "--mem", img, "--token-file", token]),
  );
  try {
    await ps.waitFor(/listening/i, "either", 30_000);
    const out = await fn(`tcp://127.0.0.1:${port}`);
    const code = await ps.stop("SIGTERM");
    if (code !== 0) throw new BenchError(`page-server exited with ${ps.describeExit()}\n${ps.tail()}`);
    return out;
  } finally {
    ps.kill("SIGKILL");
  }
}

/** bench/tcp-raw.ts: "bun" = Bun's sockets, "buffer" = the C core's, "aead" = the C core's + AES-256-GCM. */
async function rawTcp(img: string, bytes: number, how: "bun" | "buffer" | "aead" = "bun"): Promise<number> {
  const script = join(import.meta.dir, "..", "tcp-raw.ts");
  const extra = how === "bun" ? [] : [`--${how}`];
  const recv = new Proc("tcp-raw recv", pinned(SAME_CPU.handler, [BUN, script, "recv", "--bytes", String(bytes), ...extra]));
  let send: Proc | undefined;
  try {
    const port = (await recv.waitFor(/^port (\d+)$/m, "stdout"))[1]!;
    send = new Proc("tcp-raw send", pinned(REMOTE_CPU, [BUN, script, "send", "--port", port, "--file", img, ...extra]));
    const code = await recv.wait(60_000);
    const line = recv.stdout.trim().split("\n").pop() ?? "";
    if (code !== 0 || !line.startsWith("{")) throw new BenchError(`raw TCP transfer failed\n${recv.tail()}\n${send.tail()}`);
    await send.wait(10_000);
    return (JSON.parse(line) as { ns: number }).ns;
  } finally {
    recv.kill("SIGKILL");
    send?.kill("SIGKILL");
  }
}

export const postcopy: Scenario = async (ctx: Ctx) => {
  const mib = ctx.opts.quick ? 64 : 256;
  if (!ctx.features.pageServer) {
    return {
      id: "d",
      title: "postcopy over TCP",
      status: "skipped",
      notes: ["`snapload page-server` does not exist yet (not in `snapload help`)"],
      rows: [{ what: "snapload page-server + serve --mem tcp://…", result: "not built yet" }],
      data: { status: "not built yet" },
    };
  }
  const img = ctx.image(mib);
  const bytes = mib * MiB;
  const at: Placement = SAME_CPU;
  const lat = ["--order", "random", "--seed", "3", "--fraction", "0.25"];
  const tcp = { p50: [] as number[], p99: [] as number[] };
  const local = { p50: [] as number[], p99: [] as number[] };
  const busyP99: number[] = [];
  const bg: number[] = [];
  const raw: number[] = [];
  const rawBuf: number[] = [];
  const rawAead: number[] = [];
  const install: number[] = [];
  const token = tokenFile(ctx);
  const tcpArgs = ["--token-file", token];
  // --populate none: no background pull, so every touched page is a real fault round trip over TCP.
  const runTcp = () => withPageServer(img, token, (url) => snaploadRun(ctx, url, ["--fault-around", "1", "--populate", "none", ...tcpArgs], lat, at, img));
  // The same touches while `--populate background` pulls the rest: a touch whose page came in the
  // background is no fault, so the p99 is made of the faults that waited behind the stream.
  const runBusy = () => withPageServer(img, token, (url) => snaploadRun(ctx, url, ["--fault-around", "1", "--populate", "background", ...tcpArgs], lat, at, img));
  const runLocal = () => snaploadRun(ctx, img, ["--fault-around", "1"], lat, at);
  // The install floor: bench b's plain-C 2 MiB chunks, the guest touching every page in order.
  const runInstall = () => plainRun(ctx, img, ["--strategy", "chunk", "--chunk", String(2 * MiB)], ["--order", "seq"], at);
  const runBg = () =>
    withPageServer(img, token, (url) => snaploadRun(ctx, url, ["--populate", "background", "--fault-around", "16", ...tcpArgs], ["--order", "seq"], at, img));
  await warmUp(ctx, "d", [
    { label: "tcp", run: runTcp },
    { label: "local", run: runLocal },
    ...(ctx.features.populate ? [{ label: "background", run: runBg }] : []),
    { label: "raw tcp", run: () => rawTcp(img, bytes) },
    { label: "raw tcp, C sockets", run: () => rawTcp(img, bytes, "buffer") },
    { label: "raw tcp + aes-256-gcm", run: () => rawTcp(img, bytes, "aead") },
    { label: "install floor", run: runInstall },
  ]);
  for (let r = 0; r < ctx.opts.runs; r++) {
    const t = await runTcp();
    tcp.p50.push(t.report.lat_p50_ns);
    tcp.p99.push(t.report.lat_p99_ns);
    const l = await runLocal();
    local.p50.push(l.report.lat_p50_ns);
    local.p99.push(l.report.lat_p99_ns);
    if (ctx.features.populate) {
      busyP99.push((await runBusy()).report.lat_p99_ns);
      bg.push((await runBg()).report.touch_ns);
    }
    raw.push(await rawTcp(img, bytes));
    rawBuf.push(await rawTcp(img, bytes, "buffer"));
    rawAead.push(await rawTcp(img, bytes, "aead"));
    install.push((await runInstall()).report.touch_ns);
    ctx.log(
      `d run ${r + 1}: tcp p50/p99 ${fmtTime(tcp.p50.at(-1)!)}/${fmtTime(tcp.p99.at(-1)!)}, local ${fmtTime(local.p50.at(-1)!)}/${fmtTime(local.p99.at(-1)!)}` +
        `${bg.length ? `, p99 during background ${fmtTime(busyP99.at(-1)!)}, background ${fmtTime(bg.at(-1)!)}` : ""}, raw tcp ${fmtTime(raw.at(-1)!)}, raw tcp (C) ${fmtTime(rawBuf.at(-1)!)}, raw tcp + aes-256-gcm ${fmtTime(rawAead.at(-1)!)}, install ${fmtTime(install.at(-1)!)}`,
    );
  }
  const s = {
    tcpP50: summarize(tcp.p50),
    tcpP99: summarize(tcp.p99),
    localP50: summarize(local.p50),
    localP99: summarize(local.p99),
    backgroundNs: bg.length ? summarize(bg) : undefined,
    busyP99: busyP99.length ? summarize(busyP99) : undefined,
    rawTcpNs: summarize(raw),
    rawTcpBufferNs: summarize(rawBuf),
    rawTcpAeadNs: summarize(rawAead),
    installNs: summarize(install),
  };
  const rows: Row[] = [
    {
      what: "fault latency p50, serve --mem tcp:// (fault-around 1, --populate none, random)",
      median: fmtTime(s.tcpP50.median),
      best: fmtTime(s.tcpP50.min),
      result: `${(s.tcpP50.median / s.localP50.median).toFixed(1)}x local file`,
    },
    { what: "fault latency p99, serve --mem tcp://", median: fmtTime(s.tcpP99.median), best: fmtTime(s.tcpP99.min), result: `${(s.tcpP99.median / s.localP99.median).toFixed(1)}x local file` },
    ...(s.busyP99
      ? [{
        what: "fault latency p99, serve --mem tcp:// while background completion runs (--populate background, fault-around 1, random)",
        median: fmtTime(s.busyP99.median),
        best: fmtTime(s.busyP99.min),
        result: `${(s.busyP99.median / s.localP99.median).toFixed(1)}x local file`,
        target: `≤ ${BUSY_P99_TARGET}x ${check(s.busyP99.median <= BUSY_P99_TARGET * s.localP99.median)}`,
      }]
      : []),
    { what: "fault latency p50, local file", median: fmtTime(s.localP50.median), best: fmtTime(s.localP50.min) },
    { what: "fault latency p99, local file", median: fmtTime(s.localP99.median), best: fmtTime(s.localP99.min) },
  ];
  const rawRate = bytes / (s.rawTcpNs.median / 1e9);
  const aeadRate = bytes / (s.rawTcpAeadNs.median / 1e9);
  const installRate = bytes / (s.installNs.median / 1e9);
  const ceilingRate = bytes / ((s.rawTcpAeadNs.median + s.installNs.median) / 1e9);
  if (s.backgroundNs) {
    const rate = bytes / (s.backgroundNs.median / 1e9);
    rows.push({
      what: `background completion over tcp:// (--populate background --fault-around 16), ${mib} MiB`,
      median: fmtTime(s.backgroundNs.median),
      best: fmtTime(s.backgroundNs.min),
      result: `${fmtRate(rate)} = **${((rate / rawRate) * 100).toFixed(0)}%** of raw TCP, ${((rate / aeadRate) * 100).toFixed(0)}% of raw TCP + AES-256-GCM, ${((rate / ceilingRate) * 100).toFixed(0)}% of its ceiling here`,
    });
  } else {
    rows.push({ what: "background completion over tcp://", result: "skipped: flag missing (`--populate`)" });
  }
  rows.push({ what: `raw loopback TCP, same ${mib} MiB (Bun sender → Bun receiver)`, median: fmtTime(s.rawTcpNs.median), best: fmtTime(s.rawTcpNs.min), result: fmtRate(rawRate) });
  const bufRate = bytes / (s.rawTcpBufferNs.median / 1e9);
  rows.push({
    what: `raw loopback TCP, same ${mib} MiB (the C core's sockets, received into one buffer, as the client receives)`,
    median: fmtTime(s.rawTcpBufferNs.median),
    best: fmtTime(s.rawTcpBufferNs.min),
    result: `${fmtRate(bufRate)} = ${((bufRate / rawRate) * 100).toFixed(0)}% of raw TCP`,
  });
  rows.push({
    what: `raw loopback TCP + AES-256-GCM, same ${mib} MiB (C core's sockets; 128 KiB records received into a buffer, opened in place: the crypto ceiling)`,
    median: fmtTime(s.rawTcpAeadNs.median),
    best: fmtTime(s.rawTcpAeadNs.min),
    result: `${fmtRate(aeadRate)} = ${((aeadRate / rawRate) * 100).toFixed(0)}% of raw TCP`,
  });
  rows.push({
    what: `install floor, same ${mib} MiB: plain-C handler, 2 MiB UFFDIO_COPYs from memory, no network (guest touches all, seq)`,
    median: fmtTime(s.installNs.median),
    best: fmtTime(s.installNs.min),
    result: `${fmtRate(installRate)} = ${((installRate / rawRate) * 100).toFixed(0)}% of raw TCP`,
  });
  rows.push({
    what: "ceiling of background completion on the guest's CPU (TCP + AES-256-GCM, then install: the two medians added)",
    median: fmtTime(s.rawTcpAeadNs.median + s.installNs.median),
    result: `${fmtRate(ceilingRate)} = ${((ceilingRate / rawRate) * 100).toFixed(0)}% of raw TCP`,
  });
  const notes: string[] = [];
  if (s.tcpP50.median < s.localP50.median) {
    notes.push(
      "with --mem tcp:// the daemon pulls every untouched page in the background from the start, so most of the guest's touches find their page already present: " +
        "the tcp:// latency figures are touch latencies (p50 = no fault at all), not fault round trips over TCP",
    );
  }
  return {
    id: "d",
    title: `postcopy over TCP: ${mib} MiB image, daemon+guest cpu 0, page server cpu ${REMOTE_CPU}`,
    status: s.backgroundNs ? "ok" : "partial",
    notes,
    rows,
    data: { imageMiB: mib, ...s },
  };
};
