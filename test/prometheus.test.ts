// A real Prometheus (Debian's `prometheus`) scrapes `serve --metrics` on loopback; after restores
// by the VMM stand-in, its HTTP API must give the counters the stand-in saw (faults, pages).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { type Daemon, describeRun, ensureBuilt, runStandin, STANDIN, startDaemon, tempDir } from "./harness.ts";

const PROMETHEUS = Bun.which("prometheus");
const MIB = 1024 * 1024;
const PAGES = (16 * MIB) / 4096;

/** A port nobody listens on right now (Prometheus cannot report the port it bound for :0). */
async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

interface Vector {
  metric: Record<string, string>;
  value: [number, string];
}

class Prometheus {
  private stderr = "";
  private constructor(
    readonly proc: Bun.Subprocess<"ignore", "ignore", "pipe">,
    readonly api: string,
  ) {
    void (async () => {
      for await (const c of proc.stderr) this.stderr += new TextDecoder().decode(c);
    })();
  }

  static async start(dir: string, target: string): Promise<Prometheus> {
    const config = join(dir, "prometheus.yml");
    // Scrapes every 200 ms so the test waits little; the endpoint is rendered fresh each time.
    writeFileSync(config, `global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\nscrape_configs:\n  - job_name: snapload\n    static_configs:\n      - targets: ["${target}"]\n`);
    mkdirSync(join(dir, "data"));
    const port = await freePort();
    const proc = Bun.spawn(
      [PROMETHEUS!, `--config.file=${config}`, `--storage.tsdb.path=${join(dir, "data")}`, `--web.listen-address=127.0.0.1:${port}`, "--log.level=warn"],
      { stdin: "ignore", stdout: "ignore", stderr: "pipe" },
    );
    const p = new Prometheus(proc, `http://127.0.0.1:${port}`);
    await p.until("Prometheus ready", async () => (await fetch(`${p.api}/-/ready`).catch(() => undefined))?.status === 200);
    return p;
  }

  /** Polls `check` (every 100 ms, a fraction of the scrape interval) until it holds. */
  async until<T>(what: string, check: () => Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = await check();
      if (r !== undefined && r !== false) return r;
      if (this.proc.exitCode !== null) throw new Error(`prometheus exited (${this.proc.exitCode}) waiting for ${what}:\n${this.stderr}`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; prometheus said:\n${this.stderr}`);
      await Bun.sleep(100);
    }
  }

  async query(q: string, time?: number): Promise<Vector[]> {
    const url = new URL(`${this.api}/api/v1/query`);
    url.searchParams.set("query", q);
    if (time !== undefined) url.searchParams.set("time", String(time));
    const body = (await (await fetch(url)).json()) as { status: string; data: { resultType: string; result: Vector[] }; error?: string };
    if (body.status !== "success") throw new Error(`query ${q}: ${body.error}`);
    return body.data.result;
  }

  /** The single value of q at `time` (NaN if it has no sample). */
  async value(q: string, time: number): Promise<number> {
    const r = await this.query(q, time);
    if (r.length > 1) throw new Error(`${q} gave ${r.length} series`);
    return r.length ? Number(r[0]!.value[1]) : Number.NaN;
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null) this.proc.kill("SIGTERM");
    const killer = setTimeout(() => this.proc.kill("SIGKILL"), 10_000);
    await this.proc.exited;
    clearTimeout(killer);
  }
}

describe.skipIf(PROMETHEUS === null)("with a real Prometheus (skipped without the prometheus binary: scripts/deps/prometheus.txt)", () => {
  let dir: ReturnType<typeof tempDir>;
  let image: string;
  let daemon: Daemon;
  let prom: Prometheus;
  let sock: string;

  beforeAll(async () => {
    ensureBuilt();
    dir = tempDir("snapload-prometheus-");
    image = join(dir.path, "vm.mem");
    writeDemoImage(image, 16 * MIB, 13);
    sock = join(dir.path, "vm.sock");
    daemon = await startDaemon(["--mem", image, "--fault-around", "1", "--metrics", "127.0.0.1:0", "--log-format", "json"], sock);
    const target = (await daemon.waitForEvent("metrics.listening")).address as string;
    prom = await Prometheus.start(dir.path, target);
    await prom.until("the snapload target to be up", async () => (await prom.query('up{job="snapload"} == 1')).length === 1);
  }, 60_000);

  afterAll(async () => {
    await prom?.stop();
    await daemon?.stop();
    dir?.cleanup();
  });

  test("a live VM's faults and pages, then the totals after it exits, equal the stand-in's report", async () => {
    // The stand-in prints its report once every touch is served, then holds the VM connected.
    const proc = Bun.spawn([STANDIN, "--socket", sock, "--expect", image, "--order", "random", "--fraction", "0.25", "--hold", "60000"], {
      stdin: "ignore", stdout: "pipe", stderr: "pipe",
    });
    let report: { pages: number; mismatches: number } | undefined;
    let reportAt = 0;
    let out = "";
    for await (const chunk of proc.stdout) {
      out += new TextDecoder().decode(chunk);
      const line = out.split("\n").find((l) => l.startsWith("{") && l.endsWith("}"));
      if (line) {
        report = JSON.parse(line);
        reportAt = Date.now() / 1000;
        break;
      }
    }
    try {
      expect(report, out).toBeDefined();
      expect(report!.mismatches).toBe(0);
      const touched = report!.pages;
      expect(touched).toBe(PAGES / 4);
      // A scrape taken after the report (every series of a scrape shares its timestamp): by then
      // every one of the VM's faults was served.
      const [info] = await prom.until("a scrape of the held VM after its report", async () => {
        const r = await prom.query(`timestamp(snapload_vm_info{pid="${proc.pid}"}) > ${reportAt}`);
        return r.length ? r : undefined;
      });
      const t = Number(info!.value[1]);
      const [series] = await prom.query(`snapload_vm_info{pid="${proc.pid}"}`, t);
      expect(series!.metric).toMatchObject({ state: "serving", image: `raw image ${image}` });
      const vm = series!.metric.vm!;
      expect(await prom.value(`snapload_vm_faults_total{vm="${vm}"}`, t)).toBe(touched);
      expect(await prom.value(`snapload_vm_pages_served{vm="${vm}"}`, t)).toBe(touched);
      expect(await prom.value(`snapload_vm_pages{vm="${vm}"}`, t)).toBe(PAGES);
      expect(await prom.value(`snapload_vm_fault_service_seconds_count{vm="${vm}"}`, t)).toBe(touched);
      expect(await prom.value("snapload_vms_active", t)).toBe(1);
    } finally {
      proc.kill("SIGKILL");
    }
    await daemon.waitForEvent("vm.exited", (e) => e.pid === proc.pid);

    // A second VM, restored to completion: the totals then cover both.
    const r = await runStandin(["--socket", sock, "--expect", image, "--order", "seq", "--fraction", "0.5", "--threads", "2"]);
    expect(r.code, describeRun(r)).toBe(0);
    const pages = report!.pages + r.report!.pages;
    const [served] = await prom.until("a scrape after both VMs left", async () => {
      const v = await prom.query("snapload_vms_served_total == 2");
      return v.length ? v : undefined;
    });
    const t = served!.value[0];
    expect(await prom.value("snapload_vms_connected_total", t)).toBe(2);
    expect(await prom.value("snapload_vms_active", t)).toBe(0);
    expect(await prom.value("snapload_vms_failed_total", t)).toBe(0);
    expect(await prom.value('snapload_faults_total{source="image"}', t)).toBe(pages);
    expect(await prom.value('sum(snapload_pages_installed_total{how="fault"})', t)).toBe(pages);
    expect(await prom.value("sum(snapload_pages_installed_total)", t)).toBe(pages);
    expect(await prom.value('snapload_fault_service_seconds_count{source="image"}', t)).toBe(pages);
    expect(await prom.value('snapload_fault_service_seconds_bucket{source="image",le="+Inf"}', t)).toBe(pages);
    // Per-VM series exist only for live VMs.
    expect(await prom.query(`snapload_vm_info`, t)).toEqual([]);
    // A quantile over the power-of-two buckets is a bucket bound, in seconds.
    const p99 = await prom.value('histogram_quantile(0.99, snapload_fault_service_seconds_bucket{source="image"})', t);
    expect(p99).toBeGreaterThan(0);
  }, 60_000);
});
