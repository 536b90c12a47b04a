// The daemon's Unix socket file: created without a chmod anyone can redirect, never taken over
// from a live daemon, and removed on shutdown only if it is still ours (issue 8, attacks 3 and 4).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { lstatSync, readdirSync, renameSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { cstr, Errno, sl } from "../src/core/ffi.ts";
import { describeRun, ensureBuilt, ROOT, runSnapload, runStandin, startDaemon, tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let image: string;

beforeAll(() => {
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 8 * MIB, 5);
});

afterAll(() => dir?.cleanup());

/** A socket file nobody listens on (what a crashed daemon leaves behind). */
function staleSocket(path: string): void {
  const fd = sl.sl_unix_listen(cstr(path), 0o600, 1, null);
  expect(fd).toBeGreaterThanOrEqual(0);
  sl.sl_close(fd);
  expect(lstatSync(path).isSocket()).toBe(true);
}

/** No private directory is ever left behind next to the socket. */
function leftovers(): string[] {
  return readdirSync(dir.path).filter((n) => n.startsWith(".snapload-"));
}

async function restoreOk(socket: string): Promise<void> {
  const r = await runStandin(["--socket", socket, "--expect", image, "--verify", "all"]);
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.report!.mismatches).toBe(0);
}

describe("sl_unix_listen", () => {
  test("the socket gets exactly the requested mode, and no private directory is left behind", () => {
    for (const mode of [0o600, 0o640, 0o666]) {
      const path = join(dir.path, `mode-${mode.toString(8)}.sock`);
      const id = new BigUint64Array(2);
      const fd = sl.sl_unix_listen(cstr(path), mode, 4, id);
      expect(fd).toBeGreaterThanOrEqual(0);
      const st = lstatSync(path, { bigint: true });
      expect(st.isSocket()).toBe(true);
      expect(Number(st.mode & 0o7777n)).toBe(mode);
      expect([id[0], id[1]]).toEqual([st.dev, st.ino]);
      sl.sl_close(fd);
      expect(sl.sl_unix_unlink_if(cstr(path), id[0]!, id[1]!)).toBe(0);
    }
    expect(leftovers()).toEqual([]);
  });

  test("a stale socket is replaced; a live one is refused with EADDRINUSE; any other file with EEXIST", () => {
    const path = join(dir.path, "replace.sock");
    staleSocket(path);
    const live = sl.sl_unix_listen(cstr(path), 0o600, 4, null);
    expect(live).toBeGreaterThanOrEqual(0);
    const liveIno = lstatSync(path).ino;
    expect(sl.sl_unix_listen(cstr(path), 0o600, 4, null)).toBe(-Errno.EADDRINUSE);
    expect(lstatSync(path).ino).toBe(liveIno); // untouched
    sl.sl_close(live);

    const file = join(dir.path, "not-a-socket");
    writeFileSync(file, "keep me");
    expect(sl.sl_unix_listen(cstr(file), 0o600, 4, null)).toBe(-Errno.EEXIST);
    const link = join(dir.path, "a-symlink");
    symlinkSync(path, link);
    expect(sl.sl_unix_listen(cstr(link), 0o600, 4, null)).toBe(-Errno.EEXIST);
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
    expect(leftovers()).toEqual([]);
  });

  test("sl_unix_unlink_if removes only the inode it was given", () => {
    const path = join(dir.path, "unlink-if.sock");
    const id = new BigUint64Array(2);
    sl.sl_close(sl.sl_unix_listen(cstr(path), 0o600, 1, id));
    // Someone else's file now has the name: it stays.
    renameSync(image, path);
    try {
      expect(sl.sl_unix_unlink_if(cstr(path), id[0]!, id[1]!)).toBe(-Errno.EEXIST);
      expect(statSync(path).size).toBe(8 * MIB);
    } finally {
      renameSync(path, image);
    }
    expect(sl.sl_unix_unlink_if(cstr(path), id[0]!, id[1]!)).toBe(0); // already gone is fine
    expect(leftovers()).toEqual([]);
  });

  // Attack 3: the path is swapped (RENAME_EXCHANGE, thousands of times a second) for a victim file
  // or a symlink to one while the daemon (root) binds. The old bind-then-chmod(path) gave the victim
  // the socket's mode within a few dozen tries, and the stale-socket lstat-then-unlink removed it.
  for (const victim of ["file", "symlink"]) {
    test(`race: a ${victim} swapped in for the socket is never chmod-ed nor unlinked`, () => {
      const raceDir = tempDir("snapload-race-");
      try {
        const r = Bun.spawnSync([join(ROOT, "build", "listen-race"), raceDir.path, "2000", victim], { stdout: "pipe", stderr: "pipe" });
        const out = r.stdout.toString();
        expect(r.exitCode, `${out}${r.stderr.toString()}`).toBe(0);
        const report = JSON.parse(out.trim());
        expect(report).toMatchObject({ iterations: 2000, chmodded: 0, unlinked: 0, victim_mode: "600" });
        // The race really ran: the attacker swapped, and the daemon both listened and was refused.
        expect(report.swaps).toBeGreaterThan(0);
        expect(report.listened).toBeGreaterThan(0);
        expect(readdirSync(raceDir.path).filter((n) => n.startsWith(".snapload-"))).toEqual([]);
      } finally {
        raceDir.cleanup();
      }
    });
  }
});

describe("serve and its socket file", () => {
  test("a second serve on a live daemon's socket exits non-zero with a clear error; the first keeps serving", async () => {
    const socket = join(dir.path, "live.sock");
    const first = await startDaemon(["--mem", image], socket);
    try {
      const ino = lstatSync(socket).ino;
      const second = await runSnapload(["serve", "--socket", socket, "--mem", image]);
      expect(second.code).not.toBe(0);
      expect(second.stderr).toContain("another process is listening");
      expect(second.stderr).toContain(socket);
      expect(lstatSync(socket).ino).toBe(ino);
      await restoreOk(socket);
    } finally {
      expect(await first.stop()).toBe(0);
    }
  });

  test("a stale socket left by a crashed daemon is replaced", async () => {
    const socket = join(dir.path, "stale.sock");
    staleSocket(socket);
    const d = await startDaemon(["--mem", image], socket);
    try {
      await restoreOk(socket);
    } finally {
      await d.stop();
    }
  });

  test("shutdown removes the socket file only if it is still ours", async () => {
    const socket = join(dir.path, "ours.sock");
    const d = await startDaemon(["--mem", image], socket);
    expect(await d.stop()).toBe(0);
    expect(() => lstatSync(socket)).toThrow(); // ours: removed

    const d2 = await startDaemon(["--mem", image, "--log-format", "json"], socket);
    // Another daemon's socket takes the name while d2 runs (say, after an operator's mistake).
    const other = join(dir.path, "other.sock");
    staleSocket(other);
    const otherIno = lstatSync(other).ino;
    renameSync(other, socket);
    expect(await d2.stop()).toBe(0);
    expect(lstatSync(socket).ino).toBe(otherIno);
    expect(d2.events().filter((e) => e.event === "daemon.socket_left")).toMatchObject([{ socket, reason: "not ours" }]);
    expect(leftovers()).toEqual([]);
  });
});
