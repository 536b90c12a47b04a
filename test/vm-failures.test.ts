// How the daemon gives up on a VM (issue 8, found by reading): `--on-fatal kill` signals the
// process that connected through a pidfd, never a pid someone else may have been given since;
// a failure after the handshake was accepted releases the VM's fds with a log line.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { BUN, Daemon, describeRun, ensureBuilt, parseEvents, REFUSED, ROOT, runHostilePeer, runStandin, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let image: string;

beforeAll(() => {
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 8 * MIB, 9);
});

afterAll(() => dir?.cleanup());

const isRoot = process.getuid?.() === 0;
const hasUnshare = Bun.which("unshare") !== null;

describe("--on-fatal kill", () => {
  // The scenario needs its own pid namespace (to hand a freed pid to another process on purpose).
  test.skipIf(!isRoot || !hasUnshare)("a VMM's reused pid is not killed: the signal goes through the pidfd taken at connect (needs root and unshare)", async () => {
    const socket = join(dir.path, "reuse.sock");
    const proc = Bun.spawn(
      ["unshare", "--pid", "--fork", "--mount-proc", join(ROOT, "build", "pid-reuse"), socket, "--", BUN, join(ROOT, "src/main.ts"), "serve", "--socket", socket, "--mem", image, "--on-fatal", "kill", "--log-format", "json"],
      { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
    );
    const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    expect(code, `${out}\n${err}`).toBe(0);
    const r = JSON.parse(out.trim()) as { child: number; victim: number; reused: number; victim_killed: number; daemon_closed: number };
    // The scenario happened: the connecting process's pid now belongs to the victim, and the
    // daemon gave up on the VM (it closed the connection).
    expect(r.reused, out).toBe(1);
    expect(r.daemon_closed, err).toBe(1);
    expect(r.victim_killed, err).toBe(0);
    // The fault outside the announced regions failed the VM; the pidfd said its process was gone, so nothing was signalled.
    const failed = parseEvents(err).filter((e) => e.event === "vm.failed");
    expect(failed.map(({ code, action, signalErrno }) => ({ code, action, signalErrno })), err).toEqual([{ code: "UNANNOUNCED_MEMORY", action: "dropped", signalErrno: "ESRCH" }]);
  }, 60_000);
});

describe("a failure after the handshake was accepted", () => {
  test("is logged, and the VM's uffd and socket are closed (the VMM sees the hang-up; no fd leaks)", async () => {
    const socket = join(dir.path, "setup.sock");
    const proc = Bun.spawn([BUN, join(import.meta.dir, "fixtures", "failing-setup-daemon.ts"), socket, image], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    const daemon = new Daemon(proc, socket);
    try {
      await daemon.waitForEvent("daemon.listening");
      const fds = () => readdirSync(`/proc/${proc.pid}/fd`).length;
      // The daemon closes a VM's uffd, socket, then pidfd in one go; the peer sees the socket
      // close, so the pidfd's close may trail it by a reschedule. Wait for it, up to 5 s.
      const released = async () => {
        const pidfds = () => readdirSync(`/proc/${proc.pid}/fd`).filter((f) => {
          try {
            return readlinkSync(`/proc/${proc.pid}/fd/${f}`) === "anon_inode:[pidfd]";
          } catch {
            return false; // closed while we looked
          }
        }).length;
        for (const deadline = Date.now() + 5000; pidfds() > 0 && Date.now() < deadline; ) await Bun.sleep(5);
      };
      // A first VM, so lazily opened descriptors are counted before the baseline.
      const first = await runHostilePeer(["--socket", socket, "--reject-timeout", "5000"]);
      expect(first.code, describeRun(first)).toBe(REFUSED);
      await released();
      const before = fds();
      for (let i = 0; i < 5; i++) {
        const r = await runHostilePeer(["--socket", socket, "--reject-timeout", "5000"]);
        expect(r.code, describeRun(r)).toBe(REFUSED); // the daemon closed the connection
      }
      // Each setup failure is one event (the fixture's requester cannot be allocated).
      expect(daemon.events().filter((e) => e.event === "vm.setup_failed" && e.code === "SYSCALL").length, daemon.log).toBe(6);
      await released();
      expect(fds()).toBe(before);
    } finally {
      await daemon.stop();
    }
  }, 60_000);
});
