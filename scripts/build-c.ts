// Builds the C core, the VMM stand-in (`snapload demo` embeds it) and the C programs the tests
// and benchmarks run. Every program but the core links csrc/tools/tool.c, the helpers they share.
// Rebuilds only what is older than its sources, so `npm test` stays fast.
import { existsSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";

const root = join(import.meta.dir, "..");
const out = join(root, "build");
mkdirSync(out, { recursive: true });

const cc = process.env.CC ?? "cc";
const common = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"];

type Target = { output: string; sources: string[]; deps?: string[]; flags: string[] };
const targets: Target[] = [
  {
    output: "libsnapload.so",
    sources: ["csrc/snapload.c"],
    deps: ["csrc/snapload.h"],
    flags: ["-fPIC", "-shared", "-fvisibility=default", "-pthread"],
  },
  tool("vmm-standin", "csrc/tools/vmm-standin.c"),
  tool("hostile-peer", "test/hostile-peer.c"),
  tool("pid-reuse", "test/pid-reuse.c"),
  { output: "listen-race", sources: ["test/listen-race.c", "csrc/snapload.c"], deps: ["csrc/snapload.h"], flags: ["-pthread"] },
  tool("plain-handler", "bench/plain-handler.c"),
  tool("kernel-baselines", "bench/kernel-baselines.c"),
];

function tool(output: string, main: string): Target {
  return { output, sources: [main, "csrc/tools/tool.c"], deps: ["csrc/tools/tool.h"], flags: ["-pthread"] };
}

const mtime = (p: string) => (existsSync(p) ? statSync(p).mtimeMs : -1);

let failed = false;
for (const t of targets) {
  const sources = t.sources.map((s) => join(root, s));
  if (!sources.every(existsSync)) continue;
  const target = join(out, t.output);
  const newest = Math.max(...[...sources, ...(t.deps ?? []).map((d) => join(root, d))].map(mtime));
  if (mtime(target) >= newest) continue;
  const args = [cc, ...common, ...t.flags, "-o", target, ...sources];
  const r = Bun.spawnSync(args, { stdout: "inherit", stderr: "inherit" });
  if (r.exitCode !== 0) {
    console.error(`build-c: ${t.output} failed: ${args.join(" ")}`);
    failed = true;
  }
}
if (failed) process.exit(1);
