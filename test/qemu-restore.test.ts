// qemu-restore against a real, unmodified QEMU (TCG) and a real Linux guest: the guest's memory
// after a lazy restore equals its memory before the snapshot, page for page.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import type { LogRecord } from "../src/core/log.ts";
import { BUN, ROOT, ensureBuilt, parseEvents, tempDir } from "./harness.ts";
import { type PageServerProc, startPageServer } from "./postcopy-wire.ts";
import { cephMissing, createBucket, startRgw } from "./ceph-rgw.ts";
import { EVENTS_CAPABILITY, waitMigrationFinalized } from "../src/sinks/qemu/migration-status.ts";
import { QemuProc, buildInitramfs, debianKernel, guestArgs, killAllQemu, qemuMissing, waitMigration } from "./qemu-guest.ts";

const missing = qemuMissing();
const kernel = missing === undefined ? debianKernel() : undefined;
const skipReason = missing ?? (kernel && "error" in kernel ? kernel.error : undefined);
const MEM_MIB = 128;
const VGA_WINDOW = [0xa0000, 0xc0000] as const; // reads as MMIO in a dump (docs/qemu-postcopy-source.md §6)

interface Ctx {
  dir: string;
  initrd: string;
  snapshot: string;
  /** A second snapshot of the same guest, taken later with `snapload qemu-save`. */
  saved: string;
  savedReport: { servable: boolean; machine: string; sizeBytes: number };
  workingSet: string;
  dump: Uint8Array;
  sum: string;
  cleanup: () => void;
}
let ctx: Ctx;
let scratch: { cleanup: () => void } | undefined;
let n = 0;

/** A fresh destination QEMU, returned once its QMP socket accepts connections. */
async function destination(extra: string[] = [], memMiB = MEM_MIB): Promise<QemuProc> {
  const qmp = join(ctx.dir, `dst-${n++}.qmp`);
  const k = kernel as { path: string };
  const p = new QemuProc(guestArgs({ kernel: k.path, initrd: ctx.initrd, memMiB, qmp, extra: ["-incoming", "defer", ...extra] }), qmp);
  (await p.qmp()).close();
  return p;
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** The JSON events (--log-format json) in a stderr text; other lines (the final error) are skipped. */
const events = parseEvents;

/** Runs qemu-restore with JSON events; `onEvent` sees each event as it comes. */
function restore(args: string[], onEvent?: (e: LogRecord) => void, env?: Record<string, string>): { proc: Bun.Subprocess; done: Promise<Run> } {
  const proc = Bun.spawn([BUN, join(ROOT, "src/main.ts"), "qemu-restore", "--log-format", "json", ...args], { stdin: "ignore", stdout: "pipe", stderr: "pipe", ...(env ? { env } : {}) });
  const done = (async () => {
    let stderr = "";
    const dec = new TextDecoder();
    const errPump = (async () => {
      for await (const c of proc.stderr) {
        const before = stderr.length;
        stderr += dec.decode(c, { stream: true });
        // Whole lines only: a chunk can end mid-line.
        const start = stderr.lastIndexOf("\n", before - 1) + 1;
        const end = stderr.lastIndexOf("\n") + 1;
        if (onEvent && end > start) for (const e of events(stderr.slice(start, end))) onEvent(e);
      }
    })();
    const stdout = await new Response(proc.stdout).text();
    await errPump;
    return { code: await proc.exited, stdout, stderr };
  })();
  return { proc, done };
}

/** The dump with the VGA window blanked, compared per 4 KiB page. */
function differingPages(a: Uint8Array, b: Uint8Array): number[] {
  const out: number[] = [];
  for (let off = 0; off < a.length; off += 4096) {
    if (off >= VGA_WINDOW[0] && off < VGA_WINDOW[1]) continue;
    if (Buffer.compare(a.subarray(off, off + 4096), b.subarray(off, off + 4096)) !== 0) out.push(off / 4096);
  }
  return out;
}

async function pmemsave(q: Awaited<ReturnType<QemuProc["qmp"]>>, path: string): Promise<Uint8Array> {
  await q.execute("pmemsave", { val: 0, size: MEM_MIB * 1024 * 1024, filename: path });
  return new Uint8Array(readFileSync(path));
}

describe.skipIf(skipReason !== undefined)(`qemu-restore with a real QEMU${skipReason ? ` (skipped: ${skipReason})` : ""}`, () => {
  beforeAll(async () => {
    ensureBuilt();
    const t = tempDir("snapload-qemu-test-");
    scratch = t; // cleaned in afterAll even when this setup fails
    const initrd = buildInitramfs(t.path);
    const qmp = join(t.path, "src.qmp");
    const src = new QemuProc(guestArgs({ kernel: (kernel as { path: string }).path, initrd, memMiB: MEM_MIB, qmp }), qmp);
    try {
      const m = await src.waitSerial(/SUM ([0-9a-f]{32}) +- +(\d+) bytes/, 120_000);
      expect(m[2]).toBe(String(8 * 1024 * 1024)); // the data really is there, not an empty file's checksum
      const sum = m[1]!;
      await src.waitSerial(/HB 1 /, 30_000);
      const q = await src.qmp();
      await q.execute("stop");
      const dump = await pmemsave(q, join(t.path, "before.pmem"));
      // The snapshot exactly as qemu-save takes it: mapped-ram on, migrate to a file.
      await q.execute("migrate-set-capabilities", { capabilities: [{ capability: "mapped-ram", state: true }, EVENTS_CAPABILITY] });
      const snapshot = join(t.path, "snap.bin");
      await q.execute("migrate", { uri: `file:${snapshot}` });
      expect((await waitMigration(q)).status).toBe("completed");
      await q.execute("migrate-set-capabilities", { capabilities: [{ capability: "mapped-ram", state: false }] });
      await waitMigrationFinalized(q); // `cont` is refused until QEMU leaves finish-migrate
      await q.execute("cont");
      const mark = src.serial.length;
      await src.waitSerial(/HB \d+ /, 30_000, mark);
      q.close();
      // The guest runs on; qemu-save stops it and takes a second snapshot.
      const saved = join(t.path, "saved.bin");
      const save = Bun.spawnSync([BUN, join(ROOT, "src/main.ts"), "qemu-save", "--qmp", qmp, "--out", saved, "--json", "--resume"], { stdout: "pipe", stderr: "pipe" });
      expect(save.exitCode, save.stderr.toString()).toBe(0);
      const savedReport = JSON.parse(save.stdout.toString());
      // --resume: the source guest runs on after the snapshot.
      expect(savedReport.guest).toBe("running");
      await src.waitSerial(/HB \d+ /, 30_000, src.serial.length);
      ctx = { dir: t.path, initrd, snapshot, saved, savedReport, workingSet: join(t.path, "ws.bin"), dump, sum, cleanup: t.cleanup };
    } finally {
      await src.kill();
    }
  }, 180_000);

  afterAll(() => {
    killAllQemu();
    scratch?.cleanup();
  });

  test("with preempt, into a paused destination: RAM after completion equals RAM before the snapshot; the guest then runs with its data intact", async () => {
    const dst = await destination(["-S"]);
    try {
      const r = await restore(["--mem", ctx.snapshot, "--qmp", dst.qmpPath, "--json"]).done;
      expect(r.code, r.stderr).toBe(0);
      const summary = JSON.parse(r.stdout);
      expect(summary.status).toBe("completed");
      expect(summary.preempt).toBe(true);
      // Paused (-S) is seen by query-status (QEMU sends no event for it); a running guest by RESUME.
      expect(events(r.stderr).find((e) => e.event === "qemu.running")?.paused).toBe(true);
      expect(summary.timeToRunningMs).toBeGreaterThan(0);
      expect(summary.zeroPagesNotSent).toBeGreaterThan(0); // most of a fresh guest's RAM is zero
      expect(summary.pagesOnRequest + summary.pagesBackground + summary.zeroPagesNotSent).toBe(summary.pages);
      const q = await dst.qmp();
      expect((await q.execute<{ status: string }>("query-migrate")).status).toBe("completed");
      const after = await pmemsave(q, join(ctx.dir, "after.pmem"));
      expect(after.length).toBe(ctx.dump.length);
      expect(differingPages(ctx.dump, after)).toEqual([]);
      await q.execute("cont");
      // Every heartbeat recomputes the checksum of the data written before the snapshot.
      const hb = await dst.waitSerial(/HB \d+ ([0-9a-f]{32})/, 60_000);
      expect(hb[1]).toBe(ctx.sum);
      q.close();
    } finally {
      await dst.kill();
    }
  }, 120_000);

  test("without preempt, into a running destination: the guest runs during the restore and keeps its data", async () => {
    const dst = await destination();
    try {
      const r = await restore(["--mem", ctx.snapshot, "--qmp", dst.qmpPath, "--no-preempt", "--json", "--background-rate", "20", "--record", ctx.workingSet]).done;
      expect(r.code, r.stderr).toBe(0);
      expect(events(r.stderr).find((e) => e.event === "qemu.recorded")?.pages as number).toBeGreaterThan(0);
      const summary = JSON.parse(r.stdout);
      expect(summary.status).toBe("completed");
      expect(summary.bytesPreempt).toBe(0);
      expect(events(r.stderr).find((e) => e.event === "qemu.running")?.paused).toBe(false);
      expect(summary.timeToRunningMs).toBeGreaterThan(0);
      expect(summary.pagesOnRequest + summary.pagesBackground + summary.zeroPagesNotSent).toBe(summary.pages);
      const hb = await dst.waitSerial(/HB \d+ ([0-9a-f]{32})/, 60_000);
      expect(hb[1]).toBe(ctx.sum);
      const q = await dst.qmp();
      expect((await q.execute<{ status: string }>("query-status")).status).toBe("running");
      q.close();
    } finally {
      await dst.kill();
    }
  }, 120_000);

  /** A paused destination restored from `mem`; its RAM must equal the dump, then the guest's checksum must hold. */
  async function restoreAndCheck(mem: string, args: string[], onEvent?: (e: LogRecord) => void, env?: Record<string, string>): Promise<{ summary: Record<string, unknown>; stderr: string }> {
    const dst = await destination(["-S"]);
    try {
      const r = await restore(["--mem", mem, "--qmp", dst.qmpPath, "--json", ...args], onEvent, env).done;
      expect(r.code, r.stderr).toBe(0);
      const summary = JSON.parse(r.stdout);
      expect(summary.status).toBe("completed");
      const q = await dst.qmp();
      expect(differingPages(ctx.dump, await pmemsave(q, join(ctx.dir, `after-${n++}.pmem`)))).toEqual([]);
      await q.execute("cont");
      const hb = await dst.waitSerial(/HB \d+ ([0-9a-f]{32})/, 60_000);
      expect(hb[1]).toBe(ctx.sum);
      q.close();
      return { summary, stderr: r.stderr };
    } finally {
      await dst.kill();
    }
  }

  test("--mem tcp://: the snapshot served by page-server --whole-file, killed and restarted mid-restore: RAM equals the snapshot's, the guest keeps its data", async () => {
    const tokenFile = join(ctx.dir, "token");
    writeFileSync(tokenFile, "qemu-restore-remote-test-token-3a7c\n", { mode: 0o600 });
    const serve = (port = 0) => startPageServer(["--mem", ctx.snapshot, "--whole-file", "--token-file", tokenFile, "--log-format", "json"], port);
    let ps: PageServerProc | undefined = await serve();
    const port = ps.port;
    let outage: Promise<void> | undefined;
    let sawLost!: () => void;
    const lost = new Promise<void>((resolve) => (sawLost = resolve));
    try {
      const { summary, stderr } = await restoreAndCheck(`tcp://127.0.0.1:${port}`, ["--token-file", tokenFile, "--background-rate", "8"], (e) => {
        if (e.event === "remote.lost") sawLost();
        // Once the device state is in (the guest loaded, paused), the page server dies for a while.
        if (outage || e.event !== "qemu.running") return;
        const dying = ps!;
        ps = undefined;
        outage = (async () => {
          dying.daemon.proc.kill("SIGKILL");
          await dying.daemon.proc.exited;
          // Back once the restore has noticed it gone: its reconnect is what this tests.
          await lost;
          ps = await serve(port);
        })();
      });
      expect(outage, "the page server was killed mid-restore").toBeDefined();
      await outage;
      expect(summary.pagesBackground as number).toBeGreaterThan(0);
      const ev = events(stderr);
      expect(ev.some((e) => e.event === "remote.lost")).toBe(true);
      expect(ev.some((e) => e.event === "remote.back")).toBe(true);
    } finally {
      await ps?.daemon.stop();
    }
  }, 120_000);

  test("--mem file://DIR/NAME: the snapshot pushed --whole-file to a store: RAM equals the snapshot's, the guest keeps its data", async () => {
    const store = `file://${join(ctx.dir, "store")}`;
    const push = Bun.spawnSync([BUN, join(ROOT, "src/main.ts"), "push", ctx.snapshot, `${store}/guest`, "--whole-file"], { stdout: "pipe", stderr: "pipe" });
    expect(push.exitCode, push.stderr.toString()).toBe(0);
    const { stderr } = await restoreAndCheck(`${store}/guest`, ["--cache-dir", join(ctx.dir, "chunk-cache")]);
    expect(events(stderr).find((e) => e.event === "qemu.source")).toMatchObject({ mem: `${store}/guest`, badFetches: 0 });
    expect(events(stderr).find((e) => e.event === "qemu.source")!.gets).toBeGreaterThan(0);
  }, 120_000);

  const noCeph = cephMissing();
  test.skipIf(noCeph !== undefined)(`--mem s3://: the snapshot pushed --whole-file to a real Ceph RGW: RAM equals the snapshot's, the guest keeps its data${noCeph ? ` (skipped: ${noCeph})` : ""}`, async () => {
    const rgw = await startRgw();
    try {
      createBucket(rgw, "qemu");
      const env = { ...(process.env as Record<string, string>), ...rgw.env };
      const ep = ["--s3-endpoint", rgw.endpoint];
      const push = Bun.spawnSync([BUN, join(ROOT, "src/main.ts"), "push", ctx.snapshot, "s3://qemu/guest", "--whole-file", ...ep], { stdout: "pipe", stderr: "pipe", env });
      expect(push.exitCode, push.stderr.toString()).toBe(0);
      const { stderr } = await restoreAndCheck("s3://qemu/guest", [...ep, "--cache-dir", join(ctx.dir, "s3-cache")], undefined, env);
      expect(events(stderr).find((e) => e.event === "qemu.source")!.gets).toBeGreaterThan(0);
    } finally {
      await rgw.stop();
    }
  }, 120_000);

  test("inspect and qemu-save say the snapshots can be restored", async () => {
    expect(ctx.savedReport.servable).toBe(true);
    expect(ctx.savedReport.machine).toMatch(/^pc-i440fx-/);
    const r = Bun.spawnSync([BUN, join(ROOT, "src/main.ts"), "inspect", ctx.snapshot, "--json"], { stdout: "pipe", stderr: "pipe" });
    const report = JSON.parse(r.stdout.toString());
    expect(report.qemuRestore.servable).toBe(true);
    expect(report.qemuRestore.machine).toBe(ctx.savedReport.machine);
    expect(report.qemuRestore.blocks).toContain("pc.ram");
    expect(report.qemuRestore.deviceStateBytes).toBeGreaterThan(0);
  });

  test("a qemu-save snapshot, prefetching the recorded working set with fault-around: the guest keeps its data", async () => {
    const recorded = Number((await Bun.file(ctx.workingSet).bytes()).length - 28) / 4;
    // A running guest faults on its code and stack long before a 20 MiB/s background reaches them.
    expect(recorded).toBeGreaterThan(0);
    const dst = await destination();
    try {
      const r = await restore(["--mem", ctx.saved, "--qmp", dst.qmpPath, "--json", "--prefetch", ctx.workingSet, "--fault-around", "16"]).done;
      expect(r.code, r.stderr).toBe(0);
      const summary = JSON.parse(r.stdout);
      expect(summary.status).toBe("completed");
      // Prefetch goes first, but requests overtake it: some recorded pages may go out on request.
      expect(summary.pagesPrefetched).toBeGreaterThan(0);
      expect(summary.pagesPrefetched).toBeLessThanOrEqual(recorded);
      expect(summary.pagesOnRequest + summary.pagesBackground + summary.pagesPrefetched + summary.zeroPagesNotSent).toBe(summary.pages);
      const hb = await dst.waitSerial(/HB \d+ ([0-9a-f]{32})/, 60_000);
      expect(hb[1]).toBe(ctx.sum);
    } finally {
      await dst.kill();
    }
  }, 120_000);

  test("a destination started with a different -m is refused before anything is sent, and left as it was", async () => {
    const dst = await destination([], MEM_MIB * 2);
    try {
      const r = await restore(["--mem", ctx.snapshot, "--qmp", dst.qmpPath]).done;
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain(`RAM block "pc.ram" is ${MEM_MIB * 1024 * 1024} bytes in the snapshot but ${MEM_MIB * 2 * 1024 * 1024} on the destination`);
      expect(r.stderr).toContain("nothing was sent");
      const q = await dst.qmp();
      expect((await q.execute<{ status: string }>("query-status")).status).toBe("inmigrate");
      const caps = await q.execute<{ capability: string; state: boolean }[]>("query-migrate-capabilities");
      expect(caps.find((c) => c.capability === "postcopy-ram")?.state).toBe(false);
      expect((await q.execute<{ status?: string }>("query-migrate")).status ?? "none").toBe("none");
      q.close();
    } finally {
      await dst.kill();
    }
  }, 60_000);

  test("--to: the user drives QMP; a paused destination's RAM equals the snapshot's after completion (no preempt)", async () => {
    const dst = await destination(["-S"]);
    try {
      const q = await dst.qmp();
      const addr = `unix:${join(ctx.dir, "to.sock")}`;
      await q.execute("migrate-set-capabilities", { capabilities: [{ capability: "postcopy-ram", state: true }, EVENTS_CAPABILITY] });
      await q.execute("migrate-incoming", { uri: addr, "exit-on-error": false });
      // Zero pages streamed too (QEMU's own way): the dump check covers both zero-page modes.
      const r = await restore(["--mem", ctx.snapshot, "--to", addr, "--no-preempt", "--json", "--send-zero-pages"]).done;
      expect(r.code, r.stderr).toBe(0);
      const summary = JSON.parse(r.stdout);
      expect(summary.status).toBe("completed (SHUT 0)");
      expect(summary.zeroPagesNotSent).toBe(0);
      expect((await waitMigration(q)).status).toBe("completed");
      expect(differingPages(ctx.dump, await pmemsave(q, join(ctx.dir, "after-to.pmem")))).toEqual([]);
      q.close();
    } finally {
      await dst.kill();
    }
  }, 60_000);

  test("--to into a destination without postcopy-ram: a clear error that names the capability", async () => {
    const dst = await destination();
    try {
      const q = await dst.qmp();
      const addr = `unix:${join(ctx.dir, "to-nocap.sock")}`;
      await q.execute("migrate-set-capabilities", { capabilities: [EVENTS_CAPABILITY] }); // so waitMigration can wait
      await q.execute("migrate-incoming", { uri: addr, "exit-on-error": false });
      const r = await restore(["--mem", ctx.snapshot, "--to", addr]).done;
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain("with --to, set postcopy-ram and postcopy-preempt on the destination before migrate-incoming");
      expect((await waitMigration(q)).status).toBe("failed");
      q.close();
    } finally {
      await dst.kill();
    }
  }, 60_000);

  test("a QEMU not started with -incoming is refused with the reason", async () => {
    const qmp = join(ctx.dir, `plain-${n++}.qmp`);
    const plain = new QemuProc(guestArgs({ kernel: (kernel as { path: string }).path, initrd: ctx.initrd, memMiB: MEM_MIB, qmp, extra: ["-S"] }), qmp);
    try {
      await plain.qmp().then((q) => q.close());
      const r = await restore(["--mem", ctx.snapshot, "--qmp", qmp]).done;
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain(`the destination is "prelaunch", not waiting for an incoming migration: start QEMU with -incoming defer`);
    } finally {
      await plain.kill();
    }
  }, 60_000);

  test("snapload stopped mid-restore says the guest cannot complete", async () => {
    const dst = await destination();
    let stopped = false;
    const run = restore(["--mem", ctx.snapshot, "--qmp", dst.qmpPath, "--background-rate", "4"], (e) => {
      if (!stopped && e.event === "qemu.running") {
        stopped = true;
        run.proc.kill("SIGTERM");
      }
    });
    try {
      const r = await run.done;
      expect(stopped).toBe(true);
      expect(r.code).toBe(143);
      expect(events(r.stderr).find((e) => e.event === "qemu.interrupted")?.signal).toBe("SIGTERM");
      // The private directory of the migration socket is gone even so.
      const address = String(events(r.stderr).find((e) => e.event === "qemu.restoring")?.address);
      expect(address).toStartWith("unix:");
      expect(existsSync(dirname(address.slice(5)))).toBe(false);
      // Not asked over QMP: a vCPU blocked on a missing page can hold QEMU's big lock, and then
      // the monitor does not answer either (README).
      expect(dst.proc.exitCode).toBeNull();
    } finally {
      await dst.kill();
    }
  }, 60_000);

  test("QMP unreachable, or busy with another client: a clear error", async () => {
    const gone = await restore(["--mem", ctx.snapshot, "--qmp", join(ctx.dir, "nothing-here.qmp")]).done;
    expect(gone.code).not.toBe(0);
    expect(gone.stderr).toContain("cannot connect: ENOENT (is QEMU running with -qmp unix:PATH,server=on,wait=off?)");
    const dst = await destination();
    const holder = await dst.qmp(); // QEMU serves one QMP client at a time
    try {
      const busy = await restore(["--mem", ctx.snapshot, "--qmp", dst.qmpPath]).done;
      expect(busy.code).not.toBe(0);
      expect(busy.stderr).toContain("is another client connected?");
      expect((await holder.execute<{ status: string }>("query-status")).status).toBe("inmigrate");
    } finally {
      holder.close();
      await dst.kill();
    }
  }, 60_000);

  test("a destination of another machine type is refused before anything is sent", async () => {
    const dst = await destination(["-machine", "pc-i440fx-9.2"]);
    try {
      const r = await restore(["--mem", ctx.snapshot, "--qmp", dst.qmpPath]).done;
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain(`machine type mismatch: the snapshot is ${ctx.savedReport.machine}, the destination runs pc-i440fx-9.2`);
      const q = await dst.qmp();
      expect((await q.execute<{ status: string }>("query-status")).status).toBe("inmigrate");
      q.close();
    } finally {
      await dst.kill();
    }
  }, 60_000);

  test("a truncated snapshot is refused with a clear error; the destination is untouched", async () => {
    const cut = join(ctx.dir, "truncated.bin");
    expect(Bun.spawnSync(["cp", "--sparse=always", ctx.snapshot, cut]).exitCode).toBe(0);
    truncateSync(cut, Math.floor(statSync(ctx.snapshot).size / 3));
    const dst = await destination();
    try {
      const r = await restore(["--mem", cut, "--qmp", dst.qmpPath]).done;
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/truncated file\?/);
      const q = await dst.qmp();
      expect((await q.execute<{ status: string }>("query-status")).status).toBe("inmigrate");
      q.close();
    } finally {
      await dst.kill();
    }
  }, 60_000);

  test("a destination killed mid-restore: snapload exits non-zero with a clear message, without hanging", async () => {
    const dst = await destination();
    let killed = false;
    const run = restore(["--mem", ctx.snapshot, "--qmp", dst.qmpPath, "--background-rate", "4"], (e) => {
      // Kill once the guest runs: the rate cap keeps the background stream going for seconds.
      if (!killed && e.event === "qemu.running") {
        killed = true;
        dst.proc.kill("SIGKILL");
      }
    });
    try {
      const r = await run.done;
      expect(killed).toBe(true);
      expect(r.code).not.toBe(0);
      // Whichever notices first: a migration socket or the monitor.
      expect(r.stderr).toMatch(/closed the (main|preempt) migration connection before the restore completed: did QEMU exit|migration connection failed .* did QEMU exit|lost QEMU's monitor while restoring, the restore cannot complete: .*did QEMU exit\?/);
    } finally {
      await dst.kill();
    }
  }, 60_000);
});

