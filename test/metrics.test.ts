// The metrics endpoint (--metrics): histogram buckets, the exposition format, and the counters of
// a real daemon against what the VMM stand-in saw; `snapload stats` on a live daemon.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { readTokenFile } from "../src/postcopy/auth.ts";
import { encodeHeader, ErrorCode, FrameType, HEADER_SIZE, Role } from "../src/postcopy/protocol.ts";
import { Exposition, parseExposition, type Sample } from "../src/metrics/exposition.ts";
import { bucketOf, LATENCY_BUCKETS, newHistogram, observe, quantileUs } from "../src/metrics/histogram.ts";
import { type Daemon, describeRun, ensureBuilt, ROOT, runSnapload, REFUSED, runHostilePeer, runStandin, STANDIN, startDaemon, tempDir } from "./harness.ts";
import { RawClient, startPageServer } from "./postcopy-wire.ts";

const MIB = 1024 * 1024;
const PAGES = (16 * MIB) / 4096;
let dir: ReturnType<typeof tempDir>;
let image: string;

beforeAll(() => {
  ensureBuilt();
  dir = tempDir("snapload-metrics-");
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 16 * MIB, 9);
});
afterAll(() => dir?.cleanup());

describe("histogram", () => {
  test("bucket b holds latencies in (2^(b-1), 2^b] µs; the last one everything longer", () => {
    expect(bucketOf(0)).toBe(0);
    expect(bucketOf(1)).toBe(0);
    expect(bucketOf(1.01)).toBe(1);
    expect(bucketOf(2)).toBe(1);
    expect(bucketOf(3)).toBe(2);
    expect(bucketOf(1024)).toBe(10);
    expect(bucketOf(1025)).toBe(11);
    expect(bucketOf(2 ** 24)).toBe(24);
    expect(bucketOf(2 ** 24 + 1)).toBe(LATENCY_BUCKETS - 1);
    expect(bucketOf(1e12)).toBe(LATENCY_BUCKETS - 1);
  });

  test("exposition: cumulative buckets in seconds, _sum and _count; parsed back", () => {
    const h = newHistogram();
    observe(h, 3, 2); // 2 waiters, bucket le=4 µs
    observe(h, 100); // le=128 µs
    observe(h, 5e7); // beyond 16.8 s: +Inf only
    const text = new Exposition().family("t_seconds", "histogram", 'a "help"\nline').histogram("t_seconds", { vm: 'a"b' }, h).text();
    expect(text).toContain("# HELP t_seconds a \"help\"\\nline\n# TYPE t_seconds histogram\n");
    const s = parseExposition(text);
    const le = (v: string) => s.find((x) => x.name === "t_seconds_bucket" && x.labels.le === v)!.value;
    expect(le("0.000002")).toBe(0);
    expect(le("0.000004")).toBe(2);
    expect(le("0.000128")).toBe(3);
    expect(le("16.777216")).toBe(3);
    expect(le("+Inf")).toBe(4);
    expect(s.find((x) => x.name === "t_seconds_count")!.value).toBe(4);
    expect(s.find((x) => x.name === "t_seconds_sum")!.value).toBeCloseTo((6 + 100 + 5e7) / 1e6, 9);
    expect(s.every((x) => x.labels.vm === 'a"b')).toBe(true);
  });

  test("quantiles are the first bucket bound covering the fraction", () => {
    expect(quantileUs([1, 2, 4, Infinity], [0, 5, 10, 10], 0.5)).toBe(2);
    expect(quantileUs([1, 2, 4, Infinity], [0, 5, 10, 10], 0.99)).toBe(4);
    expect(quantileUs([1, 2, 4, Infinity], [0, 0, 9, 10], 0.99)).toBe(Infinity);
    expect(quantileUs([1, Infinity], [0, 0], 0.5)).toBeNaN();
  });
});

async function scrape(url: string): Promise<Sample[]> {
  const res = await fetch(url);
  expect(res.status).toBe(200);
  expect(res.headers.get("content-type")).toContain("text/plain; version=0.0.4");
  return parseExposition(await res.text());
}

const value = (s: Sample[], name: string, labels: Record<string, string> = {}) => {
  const hit = s.filter((x) => x.name === name && Object.entries(labels).every(([k, v]) => x.labels[k] === v));
  expect(hit.length, `${name} ${JSON.stringify(labels)}`).toBeGreaterThan(0);
  return hit.reduce((n, x) => n + x.value, 0);
};

describe("serve --metrics", () => {
  let d: Daemon;
  let url: string;
  const sock = () => join(dir.path, "m.sock");
  beforeAll(async () => {
    d = await startDaemon(["--mem", image, "--fault-around", "1", "--metrics", "127.0.0.1:0", "--log-format", "json"], sock());
    url = (await d.waitForEvent("metrics.listening")).url as string;
  });
  afterAll(async () => {
    await d?.stop();
  });

  test("docs/metrics.md documents every family the endpoint has", async () => {
    const doc = readFileSync(join(ROOT, "docs/metrics.md"), "utf8");
    const text = await (await fetch(url)).text();
    const families = [...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((m) => [m[1]!, m[2]!]);
    expect(families.length).toBeGreaterThan(10);
    for (const [name, type] of families) expect(doc, name).toContain(`| \`${name}\` | ${type}`);
  });

  test("only /metrics", async () => {
    expect((await fetch(url.replace("/metrics", "/"))).status).toBe(404);
    expect((await fetch(url, { method: "POST" })).status).toBe(405);
  });

  test("a live VM has its per-VM series and stats shows it; once gone, the totals equal what the stand-in saw", async () => {
    const before = await scrape(url);
    const held = await heldStandin(["--socket", sock(), "--expect", image, "--order", "random", "--fraction", "0.25", "--threads", "2"]);
    try {
      // The stand-in printed its report: every touch was served, and the VM is still connected.
      const touched = held.report.pages;
      expect(touched).toBe(Math.ceil(PAGES * 0.25));
      const live = await scrape(url);
      const info = live.find((x) => x.name === "snapload_vm_info")!;
      expect(info.labels).toMatchObject({ pid: String(held.proc.pid), state: "serving", image: `raw image ${image}` });
      const vm = info.labels.vm!;
      // One page per fault (--fault-around 1): faults, pages in place and latency samples are the touches.
      expect(value(live, "snapload_vm_faults_total", { vm })).toBe(touched);
      expect(value(live, "snapload_vm_pages", { vm })).toBe(PAGES);
      expect(value(live, "snapload_vm_pages_served", { vm })).toBe(touched);
      expect(value(live, "snapload_vm_fault_service_seconds_count", { vm })).toBe(touched);
      expect(value(live, "snapload_vm_fault_service_seconds_bucket", { vm, le: "+Inf" })).toBe(touched);
      expect(value(live, "snapload_vm_blocktime_seconds_total", { vm })).toBeGreaterThan(0);
      expect(value(live, "snapload_vms_active")).toBe(1);

      const st = await runSnapload(["stats", "--metrics", new URL(url).host]);
      expect(st.code, st.stderr).toBe(0);
      const row = st.stdout.split("\n").find((l) => l.startsWith(`${vm} `));
      expect(row, st.stdout).toBeDefined();
      expect(row!.split(/\s{2,}/).slice(0, 5)).toEqual([vm, String(held.proc.pid), "serving", `${touched}/${PAGES} (25%)`, String(touched)]);
      expect(row).toMatch(/≤[\d.]+ (µs|ms|s)\s+≤[\d.]+ (µs|ms|s)\s+raw image /);
    } finally {
      held.proc.kill("SIGKILL");
    }
    await d.waitForEvent("vm.exited", (e) => e.pid === held.proc.pid);
    const after = await scrape(url);
    const delta = (name: string, labels?: Record<string, string>) => value(after, name, labels) - value(before, name, labels);
    expect(after.some((x) => x.name === "snapload_vm_info")).toBe(false);
    expect(value(after, "snapload_vms_active")).toBe(0);
    expect(delta("snapload_vms_connected_total")).toBe(1);
    expect(delta("snapload_vms_served_total")).toBe(1);
    expect(delta("snapload_faults_total", { source: "image" })).toBe(held.report.pages);
    expect(delta("snapload_pages_installed_total", { how: "fault" })).toBe(held.report.pages);
    expect(delta("snapload_pages_installed_total")).toBe(held.report.pages);
    expect(delta("snapload_fault_service_seconds_count", { source: "image" })).toBe(held.report.pages);
    const data = delta("snapload_pages_installed_total", { how: "fault", kind: "data" });
    expect(data).toBeGreaterThan(0);
    expect(delta("snapload_data_bytes_total", { source: "image" })).toBe(data * 4096);
  }, 30_000);

  test("a rejected handshake is counted, and no VM", async () => {
    const before = await scrape(url);
    const r = await runHostilePeer(["--socket", sock(), "--region", "32m@0"]);
    expect(r.code, describeRun(r)).toBe(REFUSED);
    await d.waitForEvent("peer.rejected"); // the only one this daemon sees
    const after = await scrape(url);
    expect(value(after, "snapload_handshakes_rejected_total") - value(before, "snapload_handshakes_rejected_total")).toBe(1);
    expect(value(after, "snapload_vms_connected_total")).toBe(value(before, "snapload_vms_connected_total"));
  });
});

test("a --metrics address already in use: exit 2 naming it, no socket left behind", async () => {
  const taken = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("") });
  try {
    const sock = join(dir.path, "busy.sock");
    const r = await runSnapload(["serve", "--socket", sock, "--mem", image, "--metrics", `127.0.0.1:${taken.port}`]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`--metrics 127.0.0.1:${taken.port}: cannot listen (EADDRINUSE)`);
    expect(existsSync(sock)).toBe(false);
  } finally {
    taken.stop(true);
  }
});

describe("page-server --metrics", () => {
  test("clients, requests and bytes of a restore; an out-of-image request is an error", async () => {
    const token = join(dir.path, "token");
    writeFileSync(token, "a-test-secret-of-enough-bytes-0123456789", { mode: 0o600 });
    const ps = await startPageServer(["--mem", image, "--token-file", token, "--metrics", "127.0.0.1:0", "--log-format", "json"]);
    const sock = join(dir.path, "remote.sock");
    const d = await startDaemon(["--mem", `tcp://127.0.0.1:${ps.port}`, "--token-file", token, "--metrics", "127.0.0.1:0", "--log-format", "json"], sock);
    try {
      const psUrl = (await ps.daemon.waitForEvent("metrics.listening")).url as string;
      const dUrl = (await d.waitForEvent("metrics.listening")).url as string;
      const r = await runStandin(["--socket", sock, "--expect", image, "--order", "random", "--verify", "all"]);
      expect(r.code, describeRun(r)).toBe(0);
      await d.waitForEvent("vm.detached");
      await d.waitForEvent("vm.exited");
      const served = await scrape(dUrl);
      const m = await scrape(psUrl);
      expect(value(m, "snapload_page_server_clients_total")).toBeGreaterThanOrEqual(2);
      expect(value(m, "snapload_page_server_requests_total")).toBeGreaterThan(0);
      // Every data byte the daemon installed came through the page server (plus frame headers).
      const received = value(served, "snapload_data_bytes_total", { source: "page_server" });
      expect(received).toBeGreaterThan(0);
      expect(value(m, "snapload_page_server_sent_bytes_total")).toBeGreaterThanOrEqual(received);
      expect(value(served, "snapload_faults_total", { source: "page_server" })).toBeGreaterThan(0);
      expect(value(served, "snapload_fault_service_seconds_count", { source: "page_server" })).toBeGreaterThan(0);
      expect(value(served, "snapload_vms_detached_total")).toBe(1);
      expect(value(served, "snapload_pages_installed_total")).toBe(PAGES);
      expect(value(m, "snapload_page_server_errors_total")).toBe(0);

      // A request past the end of the image is answered with an error frame, and counted.
      const c = await RawClient.connect(ps.port);
      expect((await c.authenticate(readTokenFile(token), Role.URGENT)).type).toBe(FrameType.WELCOME);
      const req = new Uint8Array(HEADER_SIZE);
      encodeHeader(new DataView(req.buffer), 0, FrameType.REQUEST, 0, 7, 16 * MIB, 4096);
      c.send(req);
      expect((await c.next((f) => f.type === FrameType.ERROR && f.id === 7)).arg).toBe(ErrorCode.OUT_OF_BOUNDS);
      const after = await scrape(psUrl);
      expect(value(after, "snapload_page_server_errors_total", { code: "out_of_bounds" })).toBe(1);
      expect(value(after, "snapload_page_server_errors_total")).toBe(1);
      expect(value(after, "snapload_page_server_clients")).toBe(1);
      const doc = readFileSync(join(ROOT, "docs/metrics.md"), "utf8");
      for (const [, name, type] of (await (await fetch(psUrl)).text()).matchAll(/^# TYPE (\S+) (\S+)$/gm)) expect(doc, name).toContain(`| \`${name}\` | ${type}`);
      c.socket.destroy();
    } finally {
      await d.stop();
      await ps.daemon.stop();
    }
  }, 30_000);
});

/** Runs the stand-in with --hold and resolves once it printed its report (it then keeps its VM connected). */
async function heldStandin(args: string[]): Promise<{ proc: Bun.Subprocess<"ignore", "pipe", "pipe">; report: { pages: number; mismatches: number } }> {
  const proc = Bun.spawn([STANDIN, ...args, "--hold", "60000"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const decoder = new TextDecoder();
  let out = "";
  for await (const chunk of proc.stdout) {
    out += decoder.decode(chunk, { stream: true });
    const line = out.split("\n").find((l) => l.startsWith("{") && l.endsWith("}"));
    if (line) {
      const report = JSON.parse(line);
      expect(report.mismatches).toBe(0);
      return { proc, report };
    }
  }
  throw new Error(`the stand-in exited (${await proc.exited}) without a report: ${out} ${await new Response(proc.stderr).text()}`);
}
