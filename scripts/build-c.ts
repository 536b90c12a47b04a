// Builds the C core and the C programs the tests and benchmarks run.
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
  { output: "vmm-standin", sources: ["test/vmm-standin.c"], flags: ["-pthread"] },
  { output: "pid-reuse", sources: ["test/pid-reuse.c"], flags: ["-pthread"] },
  { output: "listen-race", sources: ["test/listen-race.c", "csrc/snapload.c"], deps: ["csrc/snapload.h"], flags: ["-pthread"] },
  { output: "plain-handler", sources: ["bench/plain-handler.c"], flags: ["-pthread"] },
  { output: "kernel-baselines", sources: ["bench/kernel-baselines.c"], flags: ["-pthread"] },
];

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
