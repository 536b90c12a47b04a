// A real QEMU guest for the qemu-restore tests: Debian's kernel (downloaded once with apt-get,
// cached under ~/.cache/snapload-test) and a busybox initramfs built per run. The guest fills
// tmpfs with random bytes, prints their checksum, then a heartbeat that recomputes it.
import { chmodSync, existsSync, mkdirSync, renameSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { waitMigrationState } from "../src/sinks/qemu/migration-status.ts";
import { QmpClient } from "../src/sinks/qemu/qmp.ts";

export const QEMU = Bun.which("qemu-system-x86_64");
const CACHE = process.env.SNAPLOAD_TEST_CACHE ?? join(homedir(), ".cache", "snapload-test");

function run(cmd: string[], cwd?: string): { ok: boolean; out: string } {
  const r = Bun.spawnSync(cmd, { cwd, stdout: "pipe", stderr: "pipe" });
  return { ok: r.exitCode === 0, out: `${r.stdout.toString()}${r.stderr.toString()}` };
}

/** The cached vmlinuz of Debian's linux-image-amd64, fetched on first use; or why not. */
export function debianKernel(): { path: string } | { error: string } {
  let deps = run(["apt-cache", "depends", "linux-image-amd64"]);
  // A machine whose packages were installed from an image may have no package lists: read them once.
  if (!/Depends: linux-image-/.test(deps.out) && process.getuid?.() === 0) {
    run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=600", "update"]);
    deps = run(["apt-cache", "depends", "linux-image-amd64"]);
  }
  const pkg = deps.out.match(/Depends: (linux-image-[^\s]+)/)?.[1];
  if (!deps.ok || !pkg) return { error: `cannot resolve linux-image-amd64 with apt-cache: ${deps.out.trim()}` };
  const dir = join(CACHE, pkg);
  const kernel = join(dir, "vmlinuz");
  if (existsSync(kernel)) return { path: kernel };
  mkdirSync(dir, { recursive: true });
  const dl = run(["apt-get", "download", pkg], dir);
  if (!dl.ok) return { error: `apt-get download ${pkg} failed: ${dl.out.trim()}` };
  const x = run(["sh", "-c", "dpkg-deb --fsys-tarfile linux-image-*.deb | tar -x --wildcards './boot/vmlinuz-*' && mv boot/vmlinuz-* vmlinuz.tmp && rm -rf boot linux-image-*.deb"], dir);
  if (!x.ok) return { error: `extracting the kernel from ${pkg} failed: ${x.out.trim()}` };
  renameSync(join(dir, "vmlinuz.tmp"), kernel);
  return { path: kernel };
}

const INIT = `#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs -o size=95% tmpfs /tmp
/bin/busybox head -c 8388608 /dev/urandom > /tmp/data
# fill_mib=N on the kernel command line (the benchmark): N MiB more of non-zero RAM, 8 MiB copies.
for a in $(/bin/busybox cat /proc/cmdline); do case $a in fill_mib=*) F=\${a#fill_mib=};; esac; done
k=0
while /bin/busybox test $((k * 8)) -lt \${F:-0}; do /bin/busybox cat /tmp/data > /tmp/fill$k; k=$((k+1)); done
/bin/busybox test -n "$F" && echo "FILLED $F"
echo "SUM $(/bin/busybox md5sum < /tmp/data) $(/bin/busybox wc -c < /tmp/data) bytes"
i=0
while true; do
  echo "HB $i $(/bin/busybox md5sum < /tmp/data)"
  i=$((i+1))
  /bin/busybox sleep 0.3
done
`;

/** Builds the initramfs (uncompressed newc cpio) into dir; returns its path. */
export function buildInitramfs(dir: string): string {
  const root = join(dir, "rootfs");
  rmSync(root, { recursive: true, force: true });
  for (const d of ["bin", "proc", "dev", "tmp"]) mkdirSync(join(root, d), { recursive: true });
  const busybox = Bun.which("busybox") ?? "/bin/busybox";
  Bun.spawnSync(["cp", busybox, join(root, "bin", "busybox")]);
  symlinkSync("busybox", join(root, "bin", "sh"));
  writeFileSync(join(root, "init"), INIT);
  chmodSync(join(root, "init"), 0o755);
  const out = join(dir, "initrd.cpio");
  const r = Bun.spawnSync(["sh", "-c", `find . | cpio -o -H newc > ${out}`], { cwd: root, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`cpio failed: ${r.stderr.toString()}`);
  return out;
}

/** Why the QEMU tests cannot run here, or undefined. */
export function qemuMissing(): string | undefined {
  if (!QEMU) return "qemu-system-x86_64 is not installed (npm test installs qemu-system-x86 from bookworm-backports as root)";
  if (!Bun.which("busybox") && !existsSync("/bin/busybox")) return "busybox-static is not installed";
  if (!Bun.which("cpio")) return "cpio is not installed";
  if (!existsSync("/dev/userfaultfd") && process.getuid?.() !== 0) return "userfaultfd is not available to this user";
  return undefined;
}

export interface GuestOptions {
  kernel: string;
  initrd: string;
  memMiB: number;
  qmp: string;
  extra?: string[];
  /** Kernel command line additions (e.g. fill_mib=N). */
  append?: string;
}

/** The command line both the source and the destination use (the destination adds -incoming). */
export function guestArgs(o: GuestOptions): string[] {
  return [
    QEMU!, "-accel", "tcg", "-machine", "pc", "-m", String(o.memMiB), "-nodefaults", "-display", "none", "-vga", "none",
    "-serial", "stdio", "-no-reboot", "-kernel", o.kernel, "-initrd", o.initrd,
    "-append", `console=ttyS0 quiet panic=-1${o.append ? ` ${o.append}` : ""}`, "-qmp", `unix:${o.qmp},server=on,wait=off`, ...(o.extra ?? []),
  ];
}

const live = new Set<Bun.Subprocess>();

/** SIGKILLs every QEMU still running (a test that timed out skips its own cleanup). A QEMU
 *  whose vCPU waits on a page that will never come ignores SIGTERM. */
export function killAllQemu(): void {
  for (const p of live) p.kill("SIGKILL");
}

/** One QEMU process; its serial console (stdout) and stderr are collected as they come. */
export class QemuProc {
  serial = "";
  stderr = "";
  readonly exited: Promise<number>;
  #waiters: (() => void)[] = [];

  constructor(readonly args: string[], readonly qmpPath: string) {
    const proc = Bun.spawn(args, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    this.proc = proc;
    live.add(proc);
    void proc.exited.then(() => live.delete(proc));
    const pump = async (s: ReadableStream<Uint8Array>, into: "serial" | "stderr") => {
      const dec = new TextDecoder();
      for await (const c of s) {
        this[into] += dec.decode(c, { stream: true });
        for (const w of this.#waiters.splice(0)) w();
      }
    };
    const pumps = Promise.all([pump(proc.stdout, "serial"), pump(proc.stderr, "stderr")]);
    this.exited = pumps.then(() => proc.exited).then((c) => {
      for (const w of this.#waiters.splice(0)) w();
      return c;
    });
  }

  readonly proc: Bun.Subprocess<"ignore", "pipe", "pipe">;

  /** Resolves with the first match of pattern in the serial output (from `from` on). */
  async waitSerial(pattern: RegExp, timeoutMs: number, from = 0): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.serial.slice(from).match(pattern);
      if (m) return m;
      if (this.proc.exitCode !== null) throw new Error(`QEMU exited (${this.proc.exitCode}) before ${pattern}; stderr: ${this.stderr}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`serial never matched ${pattern} in ${timeoutMs} ms; serial: ${this.serial.slice(-500)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** QMP is up once QEMU has created the socket; connecting retries until then. */
  async qmp(timeoutMs = 10_000): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await QmpClient.connect(this.qmpPath, 2000);
      } catch (e) {
        if (this.proc.exitCode !== null || Date.now() > deadline) throw e;
        await Bun.sleep(50); // the socket appears a few ms after exec; nothing to wait on
      }
    }
  }

  async kill(): Promise<void> {
    if (this.proc.exitCode === null) this.proc.kill("SIGKILL");
    await this.exited;
  }
}

/** Waits until the migration reaches a final state, on QEMU's MIGRATION events (the `events`
 *  capability must have been set before migrate / migrate-incoming). */
export async function waitMigration(q: QmpClient, timeoutMs = 60_000): Promise<{ status: string; "error-desc"?: string }> {
  const m = await waitMigrationState(q, ["completed", "failed"], timeoutMs);
  if (m.timedOut) throw new Error(`migration still ${m.status} after ${timeoutMs} ms`);
  return { ...m, status: m.status ?? "none" };
}
