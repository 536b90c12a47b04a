// End to end: `snapload serve` against the C VMM stand-in (Firecracker's side of the handshake).
// Every restore compares every touched page with the image.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import type { LogRecord } from "../src/core/log.ts";
import { type Daemon, describeRun, ensureBuilt, REFUSED, runHostilePeer, runStandin, startDaemon, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let image: string;
let daemon: Daemon;
let socket: string;

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 64 * MIB, 7);
  socket = join(dir.path, "h.sock");
  daemon = await startDaemon(["--mem", image, "--handshake-timeout", "1500", "--log-level", "debug", "--log-format", "json"], socket);
});

afterAll(async () => {
  await daemon?.stop();
  dir?.cleanup();
});

async function restore(args: string[]) {
  const r = await runStandin(["--socket", socket, "--expect", image, ...args]);
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
  expect(r.report!.verified).toBeGreaterThan(0);
  return r.report!;
}

describe("restores with every page correct", () => {
  test("sequential order, every page", async () => {
    const rep = await restore(["--order", "seq", "--verify", "all"]);
    expect(rep.verified).toBe((64 * MIB) / 4096);
  });

  test("random order", async () => {
    const rep = await restore(["--order", "random", "--seed", "3"]);
    expect(rep.pages).toBe((64 * MIB) / 4096);
  });

  test("two vCPU threads", async () => {
    const rep = await restore(["--order", "random", "--threads", "2", "--verify", "all"]);
    expect(rep.verified).toBe((64 * MIB) / 4096);
  });

  test("two regions far apart (x86 layout around the MMIO gap)", async () => {
    const rep = await restore(["--region", "24m@0", "--region", "40m@24m", "--far", "--order", "random", "--verify", "all"]);
    expect(rep.verified).toBe((64 * MIB) / 4096);
  });

  test("regions out of image order", async () => {
    const rep = await restore(["--region", "16m@48m", "--region", "16m@0", "--order", "random"]);
    expect(rep.verified).toBe((32 * MIB) / 4096);
  });

  test("first touch is a write", async () => {
    const rep = await restore(["--touch", "write", "--order", "random", "--threads", "2"]);
    expect(rep.pages).toBe((64 * MIB) / 4096);
  });

  test("balloon before touch: discarded pages read as zeros", async () => {
    await restore(["--balloon", "0:8m", "--balloon", "32m:4m", "--order", "random", "--verify", "all"]);
  });

  test("balloon after touch: installed then discarded pages read as zeros", async () => {
    await restore(["--balloon-after", "4m:16m", "--order", "seq", "--verify", "all"]);
  });

  for (const format of ["v1", "v7", "v12", "future"]) {
    test(`wire format ${format}`, async () => {
      const rep = await restore(["--format", format, "--region", "8m@16m", "--verify", "all"]);
      expect(rep.verified).toBe((8 * MIB) / 4096);
    });
  }

  test("four VMs at once", async () => {
    const runs = await Promise.all(
      [1, 2, 3, 4].map((seed) => runStandin(["--socket", socket, "--expect", image, "--order", "random", "--seed", String(seed), "--verify", "all"])),
    );
    for (const r of runs) {
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.report!.mismatches).toBe(0);
      expect(r.report!.verified).toBe((64 * MIB) / 4096);
    }
  });

  test("a VM that dies mid-restore is forgotten; the next VM is served", async () => {
    const hungUp = (e: LogRecord) => e.reason === "VMM hung up";
    const before = daemon.events().filter((e) => e.event === "vm.exited" && hungUp(e)).length;
    const dying = await runStandin(["--socket", socket, "--expect", image, "--order", "random", "--exit-after", "1000"]);
    expect(dying.code).not.toBe(0);
    await daemon.waitForEvents("vm.exited", before + 1, hungUp);
    await restore(["--region", "8m@0", "--verify", "all"]);
  });
});

describe("resources", () => {
  test("every fd a VM brought is released when it exits (no leak across 20 VMs, good and bad)", async () => {
    const fds = () => readdirSync(`/proc/${daemon.proc.pid}/fd`).length;
    // One VM first, so lazily opened descriptors (JIT, timers) are already counted.
    const exits = () => daemon.events().filter((e) => e.event === "vm.exited").length;
    const rejects = () => daemon.events().filter((e) => e.event === "peer.rejected").length;
    // Counted before the restore: its exit event may be logged before restore() returns.
    const first = exits();
    await restore(["--region", "4m@0"]);
    await daemon.waitForEvents("vm.exited", first + 1);
    const [exited, rejected] = [exits(), rejects()];
    const before = fds();
    for (let i = 0; i < 10; i++) {
      await restore(["--region", "4m@0", "--format", "future", "--extra-fd"]);
      const bad = await runHostilePeer(["--socket", socket, "--fds", "many"]);
      expect(bad.code, describeRun(bad)).toBe(REFUSED);
    }
    // Exits and rejections are logged once the daemon has closed that peer's every fd.
    await daemon.waitForEvents("vm.exited", exited + 10);
    await daemon.waitForEvents("peer.rejected", rejected + 10);
    expect(fds()).toBe(before);
  });
});

describe("the socket", () => {
  test("is created mode 0600", () => {
    expect(statSync(socket).mode & 0o777).toBe(0o600);
  });

  test("a stale socket file is replaced, and SIGTERM removes it", async () => {
    const d2 = tempDir();
    const sock = join(d2.path, "stale.sock");
    // A socket file left by a dead daemon: bind and never close it properly.
    const first = await startDaemon(["--mem", image], sock);
    first.proc.kill("SIGKILL");
    await first.proc.exited;
    expect(existsSync(sock)).toBe(true);
    const second = await startDaemon(["--mem", image, "--socket-mode", "0660"], sock);
    expect(statSync(sock).mode & 0o777).toBe(0o660);
    const r = await runStandin(["--socket", sock, "--expect", image, "--region", "4m@0", "--verify", "all"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(await second.stop()).toBe(0);
    expect(existsSync(sock)).toBe(false);
    d2.cleanup();
  });

  test("a path that is not a socket is never replaced", async () => {
    const d2 = tempDir();
    const path = join(d2.path, "not-a-socket");
    writeFileSync(path, "precious");
    const proc = Bun.spawn([process.execPath, join(import.meta.dir, "../src/main.ts"), "serve", "--socket", path, "--mem", image], {
      stderr: "pipe",
    });
    const code = await proc.exited;
    const err = await new Response(proc.stderr).text();
    expect(code).not.toBe(0);
    expect(err).toContain("not a stale socket file; refusing to replace it");
    expect(await Bun.file(path).text()).toBe("precious");
    d2.cleanup();
  });
});

describe("bad input from a VMM: one clear line, that connection closed, others unaffected", () => {
  const big = 2 ** 53 + 2;
  const cases: [string, string[], RegExp][] = [
    ["not JSON", ["--body", "hello, handler"], /not a JSON array/],
    ["wrong types", ["--body", '[{"base_host_virt_addr":"0x1000","size":4096,"offset":0}]'], /expected number/],
    ["negative number", ["--body", '[{"base_host_virt_addr":4096,"size":4096,"offset":-4096}]'], /offset/],
    ["number beyond 2^53", ["--body", `[{"base_host_virt_addr":${big},"size":4096,"offset":0}]`], /larger than 2\^53/],
    ["no regions", ["--body", "[]"], /no regions/],
    ["bytes after the JSON array", ["--body", '[{"base_host_virt_addr":4096,"size":4096,"offset":0}] {"more":1}'], /bytes after the end of the JSON array/],
    ["region past the end of the image", ["--body", `[{"base_host_virt_addr":4096,"size":${8 * MIB},"offset":${60 * MIB}}]`], /past the end of the image/],
    [
      "overlapping regions",
      ["--body", '[{"base_host_virt_addr":1048576,"size":1048576,"offset":0},{"base_host_virt_addr":1052672,"size":4096,"offset":0}]'],
      /overlap/,
    ],
    ["base not page aligned", ["--body", '[{"base_host_virt_addr":4097,"size":4096,"offset":0}]'], /not aligned/],
    ["size not page aligned", ["--body", '[{"base_host_virt_addr":4096,"size":100,"offset":0}]'], /not aligned/],
    ["page size neither 4 KiB nor 2 MiB", ["--body", '[{"base_host_virt_addr":65536,"size":65536,"offset":0,"page_size":65536}]'], /neither 4 KiB nor 2 MiB/],
    ["page_size and page_size_kib disagree", ["--body", '[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":2097152}]'], /disagree/],
    ["no fd", ["--fds", "none"], /no file descriptor/],
    ["an fd that is not a userfaultfd", ["--fds", "notuffd"], /is a userfaultfd/],
    ["several fds", ["--fds", "many"], /file descriptors came with the handshake/],
    ["a megabyte of garbage", ["--garbage", String(MIB)], /not valid JSON|larger than/],
    ["a peer that connects and sends nothing", ["--silent"], /no complete handshake within/],
  ];

  test("every bad peer is refused while a good VM restores", async () => {
    const good = runStandin(["--socket", socket, "--expect", image, "--order", "random", "--threads", "2", "--verify", "all"]);
    const bad = await Promise.all(cases.map(([, args]) => runHostilePeer(["--socket", socket, "--region", "8m@0", ...args])));
    bad.forEach((r, i) => {
      expect(r.code, `${cases[i]![0]}: ${describeRun(r)}`).toBe(REFUSED);
    });
    const rejected = daemon.events().filter((e) => e.event === "peer.rejected");
    for (const [name, , pattern] of cases) {
      expect(rejected.filter((e) => pattern.test(String(e.reason))).length, `no peer.rejected for "${name}" with a reason matching ${pattern}\n${daemon.log}`).toBeGreaterThanOrEqual(1);
    }
    const g = await good;
    expect(g.code, describeRun(g)).toBe(0);
    expect(g.report!.mismatches).toBe(0);
    expect(g.report!.verified).toBe((64 * MIB) / 4096);
  });

  test("a VMM whose faults land outside the regions it announced is killed, others unaffected", async () => {
    const good = runStandin(["--socket", socket, "--expect", image, "--order", "random", "--verify", "all"]);
    const liar = await runHostilePeer(["--socket", socket, "--region", "8m@0", "--announce-half"]);
    // SIGKILL from the daemon (Firecracker's advice): the shell-style exit is a signal, not a code.
    expect(liar.code, describeRun(liar)).not.toBe(0);
    const failed = await daemon.waitForEvent("vm.failed", (e) => /^fault at 0x[0-9a-f]+ outside every region the VMM announced$/.test(String(e.reason)));
    expect(failed.action).toBe("killed");
    expect(failed.code).toBe("UNANNOUNCED_MEMORY");
    const g = await good;
    expect(g.code, describeRun(g)).toBe(0);
    expect(g.report!.verified).toBe((64 * MIB) / 4096);
  });

  test("two fds (uffd + memfd, like e2b's VMM) are accepted and the extra closed", async () => {
    const rep = await restore(["--extra-fd", "--region", "4m@0", "--verify", "all"]);
    expect(rep.verified).toBe((4 * MIB) / 4096);
  });
});
