// http:// stores: a file:// store published by a real nginx on loopback, read-only: inspect,
// pull, a lazy restore verified page by page (directly, and through a page server fronting the
// store); push is refused.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describeRun, ensureBuilt, runSnapload, runStandin, pushDemoImage, startDaemon, tempDir } from "./harness.ts";
import { startPageServer } from "./postcopy-wire.ts";

const MIB = 1024 * 1024;
const SIZE = 16 * MIB;
let dir: ReturnType<typeof tempDir>;
let image: string;
let nginx: Bun.Subprocess | undefined;
let base: string;

async function freePort(): Promise<number> {
  const s = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = s.port;
  s.stop(true);
  return port;
}

beforeAll(async () => {
  const bin = Bun.which("nginx") ?? (Bun.which("nginx", { PATH: "/usr/sbin:/sbin" }) || null);
  if (bin === null) throw new Error("nginx is missing: run `apt-get install -y nginx-light` (or `bash scripts/ensure-deps.sh` as root)");
  ensureBuilt();
  dir = tempDir();
  const { image: pushed, store } = await pushDemoImage(dir.path, SIZE, 44);
  image = pushed;
  const port = await freePort();
  const conf = join(dir.path, "nginx.conf");
  // Workers run as root so they can read the test's 0700 temp directory.
  writeFileSync(
    conf,
    `daemon off; master_process on; worker_processes 1; user root; pid ${dir.path}/nginx.pid; error_log ${dir.path}/nginx.err;
events { worker_connections 64; }
http { access_log off; server { listen 127.0.0.1:${port}; root ${store}; location / { } } }
`,
  );
  nginx = Bun.spawn([bin, "-c", conf, "-p", dir.path], { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
  base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 10_000;
  for (;;) {
    const ok = await fetch(`${base}/snapshots/vm`).then((r) => r.status === 200, () => false);
    if (ok) break;
    if (nginx.exitCode !== null || Date.now() > deadline) throw new Error(`nginx did not start: ${await new Response(nginx.stderr as ReadableStream).text()}`);
    // No readiness signal from nginx: poll its port.
    await Bun.sleep(20);
  }
});

afterAll(async () => {
  nginx?.kill("SIGTERM");
  await nginx?.exited;
  dir?.cleanup();
});

describe("http:// store behind nginx", () => {
  test("inspect and pull through plain GETs; pull is byte-identical", async () => {
    const ins = await runSnapload(["inspect", `${base}/vm`, "--json"]);
    expect(ins.code, ins.stderr).toBe(0);
    expect(JSON.parse(ins.stdout).size).toBe(SIZE);
    const out = join(dir.path, "pulled.mem");
    const pl = await runSnapload(["pull", `${base}/vm`, out]);
    expect(pl.code, pl.stderr).toBe(0);
    expect(Bun.hash(readFileSync(out))).toBe(Bun.hash(readFileSync(image)));
  });

  test("serve --mem http://: a lazy restore, every page verified", async () => {
    const d = await startDaemon(["--mem", `${base}/vm`, "--cache-dir", join(dir.path, "cache"), "--log-format", "json"], join(dir.path, "h.sock"));
    try {
      const r = await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.report!.mismatches).toBe(0);
      expect(r.report!.verified).toBe(SIZE / 4096);
    } finally {
      await d.stop();
    }
    expect(d.events().find((e) => e.event === "store.closed")).toMatchObject({ ref: `${base}/vm`, gets: 64 });
  }, 60_000);

  test("page-server --mem http://: a rack's page server fronts the published store; a client's restore is verified page by page", async () => {
    const token = join(dir.path, "token");
    writeFileSync(token, "http-page-server-token-71c2\n", { mode: 0o600 });
    const ps = await startPageServer(["--mem", `${base}/vm`, "--token-file", token, "--cache-dir", join(dir.path, "ps-cache"), "--log-format", "json"]);
    try {
      const d = await startDaemon(["--mem", `tcp://127.0.0.1:${ps.port}`, "--token-file", token], join(dir.path, "ph.sock"));
      try {
        const r = await runStandin(["--socket", d.socket, "--expect", image, "--order", "random", "--verify", "all"]);
        expect(r.code, describeRun(r)).toBe(0);
        expect(r.report!.mismatches).toBe(0);
        expect(r.report!.verified).toBe(SIZE / 4096);
      } finally {
        await d.stop();
      }
    } finally {
      await ps.daemon.stop();
    }
    expect(ps.daemon.events().find((e) => e.event === "store.closed")).toMatchObject({ ref: `${base}/vm`, gets: 64 });
  }, 60_000);

  test("push to an http:// store is refused: it is read-only", async () => {
    const r = await runSnapload(["push", image, `${base}/again`]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/read-only store; push to file:\/\/ or s3:\/\//);
  });
});
