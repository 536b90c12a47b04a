// `snapload demo`: a whole lazy restore on this machine, end to end, in one command.
// Makes an image, serves it, runs the C VMM stand-in (csrc/tools/vmm-standin.c, docs/vmm-standin.md:
// Firecracker's side of the handshake) as the guest, and shows that every page the guest read equals the image.
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
// Embedded into the single binary; a plain path when run from source.
import standinEmbedded from "../../build/vmm-standin" with { type: "file" };
import type { DemoConfig } from "./demo.ts";
import { writeDemoImage } from "./demo-image.ts";
import { imageBackend } from "../sources/image/image-backend.ts";
import { openImage } from "../sources/image/open-image.ts";
import { formatBytes, Logger } from "../core/log.ts";
import { Server, type VmExit } from "../daemon/server.ts";

interface StandinReport {
  pages: number;
  verified: number;
  mismatches: number;
  touch_ns: number;
  lat_p50_ns: number;
  lat_p99_ns: number;
}

export async function demoCommand(config: DemoConfig): Promise<number> {
  const dir = config.dir ?? mkdtempSync(join(tmpdir(), "snapload-demo-"));
  const out = (s: string) => process.stdout.write(`${s}\n`);
  try {
    const bytes = config["size-mib"] * 1024 * 1024;
    const imagePath = join(dir, "demo.mem");
    out(`snapload demo: making a ${formatBytes(bytes)} memory image (zero pages, text, random bytes) in ${dir}`);
    const made = writeDemoImage(imagePath, bytes);
    const image = openImage(imagePath, {});
    out(`  image: ${image.dataPages} data pages, ${image.zeroPages} zero pages (found as file holes)`);

    const socketPath = join(dir, "handler.sock");
    const server = new Server({
      listeners: [{ socketPath, socketMode: 0o600, source: { kind: "image", backend: imageBackend(image) } }],
      faultAround: config["fault-around"],
      handshakeTimeoutMs: 5000,
      onFatal: "kill",
      populate: "none",
      logger: new Logger("warn"),
    });
    server.listen();
    let exit: VmExit | undefined;
    server.onVmExit = (e) => {
      exit = e;
      server.close();
    };

    const standin = standinBinary(dir);
    out(`  serving on ${socketPath}; restoring a stand-in VM (${config.threads} vCPU threads, random touch order)`);
    const proc = Bun.spawn(
      [standin, "--socket", socketPath, "--expect", imagePath, "--order", "random", "--threads", String(config.threads), "--verify", "all", "--progress"],
      { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
    );
    const progress = showProgress(proc.stderr, made.pages);
    const stdoutText = new Response(proc.stdout).text();
    const started = performance.now();
    const serving = server.run();
    const code = await proc.exited;
    await serving;
    const seconds = (performance.now() - started) / 1000;
    const errText = await progress;
    image.close();

    const line = (await stdoutText).trim().split("\n").pop() ?? "";
    if (code !== 0 || !line.startsWith("{")) {
      process.stderr.write(`\nsnapload demo: the stand-in VM failed (exit ${code}):\n${errText}\n`);
      return 1;
    }
    const report = JSON.parse(line) as StandinReport;
    const s = exit?.stats;
    out("");
    out(`  pages served:   ${s?.pagesInstalled ?? 0} (${s?.zeroPagesInstalled ?? 0} as zero pages, never read from the file)`);
    const fa = config["fault-around"];
    out(`  faults served:  ${s?.faults ?? 0} (${fa === 1 ? "one page per fault" : `fault-around ${fa}: each fault installs the aligned ${fa} pages around it`})`);
    out(`  guest touch:    ${(report.touch_ns / 1e9).toFixed(2)} s for ${report.pages} pages (restore wall time ${seconds.toFixed(2)} s)`);
    out(`  touch latency:  p50 ${(report.lat_p50_ns / 1000).toFixed(1)} µs, p99 ${(report.lat_p99_ns / 1000).toFixed(1)} µs (first touch of a page; a fault when it was not yet installed)`);
    if (report.mismatches === 0 && report.verified === made.pages) {
      out(`  all ${report.verified} pages verified against the image`);
      return 0;
    }
    out(`  VERIFICATION FAILED: ${report.mismatches} of ${report.verified} pages differ`);
    return 1;
  } finally {
    if (!config.keep && !config.dir) rmSync(dir, { recursive: true, force: true });
  }
}

/** The stand-in as an executable file: from the build tree, or copied out of the single binary. */
function standinBinary(dir: string): string {
  if (existsSync(standinEmbedded) && !standinEmbedded.startsWith("/$bunfs")) return standinEmbedded;
  const path = join(dir, "vmm-standin");
  // copyFileSync cannot read Bun's embedded file system; readFileSync can.
  writeFileSync(path, readFileSync(standinEmbedded), { mode: 0o755 });
  chmodSync(path, 0o755);
  return path;
}

async function showProgress(stream: ReadableStream<Uint8Array>, total: number): Promise<string> {
  const tty = process.stderr.isTTY;
  const decoder = new TextDecoder();
  let other = "";
  let pending = "";
  let lastShown = -1;
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      const m = line.match(/^progress (\d+) (\d+)/);
      if (!m) {
        other += `${line}\n`;
        continue;
      }
      const done = Number(m[1]);
      const of = Number(m[2]) || total;
      const pct = Math.floor((done / of) * 100);
      if (tty) {
        const width = 40;
        const fill = Math.round((done / of) * width);
        process.stderr.write(`\r  [${"#".repeat(fill)}${".".repeat(width - fill)}] ${pct}% ${done}/${of} pages`);
      } else if (pct >= lastShown + 25) {
        process.stdout.write(`  ${pct}% (${done}/${of} pages)\n`);
        lastShown = pct;
      }
    }
  }
  if (tty) process.stderr.write("\n");
  return other + pending;
}
