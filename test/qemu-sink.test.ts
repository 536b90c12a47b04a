// The QEMU sink's scheduling, against a stand-in destination on real Unix sockets that decodes
// the stream itself: every data page exactly once with the snapshot's bytes, zero pages only on
// request, requests answered on the preempt channel with data-only fault-around, prefetch first,
// and a background that continues after the guest's last request.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { imageBackend } from "../src/sources/image/image-backend.ts";
import { openMappedRamBlocks } from "../src/sources/image/mapped-ram.ts";
import type { SnapshotImage } from "../src/sources/image/snapshot-image.ts";
import { Logger, silentLogger } from "../src/core/log.ts";
import { QemuPageSink, localPages, type SinkOptions } from "../src/sinks/qemu/page-sink.ts";
import { readDeviceState, readSnapshotStream, type SnapshotStream } from "../src/sinks/qemu/snapshot-stream.ts";
import { openRemoteFile, openSource } from "../src/sources/open-source.ts";
import type { RemoteFile } from "../src/sources/remote-file.ts";
import { readRemoteSnapshot, remotePages } from "../src/sinks/qemu/remote-snapshot.ts";
import { push } from "../src/sources/store/push.ts";
import { openServedStore } from "../src/sources/store/served-store.ts";
import { generateMappedRam, type GeneratedMappedRam } from "./gen-mapped-ram.ts";
import { ensureBuilt, tempDir } from "./harness.ts";
import { type PageServerProc, startPageServer } from "./postcopy-wire.ts";
import { DEVICE, type Received, StandinDestination, type StandinOptions, withQemuTail } from "./qemu-standin.ts";

let tmp: ReturnType<typeof tempDir>;
let gen: GeneratedMappedRam;
let stream: SnapshotStream;
const expected = new Map<string, Buffer>();

beforeAll(() => {
  ensureBuilt();
  tmp = tempDir("snapload-qemu-sink-");
  gen = generateMappedRam(join(tmp.path, "snap.bin"), { ramMiB: 4, seed: 7 });
  withQemuTail(gen);
  stream = readSnapshotStream(gen.path);
  for (const b of gen.blocks) expected.set(b.name, readFileSync(b.expectFile!));
});
afterAll(() => tmp?.cleanup());

const isData = (block: string, page: number) => {
  const b = gen.blocks.find((x) => x.name === block)!;
  return ((b.bitmap[page >> 3]! >> (page & 7)) & 1) === 1;
};

let n = 0;
async function restore(opts: Partial<SinkOptions>, standin: StandinOptions) {
  const path = join(tmp.path, `dst-${n++}.sock`);
  const dest = new StandinDestination(path, standin);
  await dest.listen();
  const images: SnapshotImage[] = [];
  const sink = new QemuPageSink(
    stream.ram.blocks.map((b) => ({ name: b.name, usedLength: b.usedLength })),
    () => {
      images.push(...openMappedRamBlocks(gen.path, false));
      return localPages(images.map(imageBackend));
    },
    { sectionId: stream.ramSectionId, header: stream.header, deviceState: readDeviceState(stream), pageSizeSummary: 4096, preempt: true, faultAround: 1, logger: silentLogger, ...opts },
  );
  try {
    const stats = await sink.run({ kind: "unix", path });
    await dest.done;
    return { dest, stats, sink };
  } finally {
    dest.close();
    for (const i of images) i.close();
  }
}

/**
 * Each data page exactly once with the snapshot's bytes; nothing twice; ZERO only for zero pages.
 * `complete` false: a restore that failed; what it sent must still be right.
 */
function checkPages(records: Received[], complete = true): void {
  const seen = new Set<string>();
  for (const r of records) {
    const key = `${r.block}#${r.page}`;
    expect(seen.has(key), `${key} sent twice`).toBe(false);
    seen.add(key);
    expect(r.zero, `${key}: ZERO record for a data page, or data for a zero page`).toBe(!isData(r.block, r.page));
    if (r.data) expect(r.data.equals(expected.get(r.block)!.subarray(r.page * 4096, (r.page + 1) * 4096)), `${key} bytes`).toBe(true);
  }
  if (!complete) return;
  for (const b of gen.blocks) {
    for (let p = 0; p < b.pages; p++) if (isData(b.name, p)) expect(seen.has(`${b.name}#${p}`), `${b.name}#${p} never sent`).toBe(true);
  }
}

describe("QEMU sink against a stand-in destination", () => {
  test("with preempt: requests answered on the preempt channel with data-only fault-around; every data page once; zero pages only on request", async () => {
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    // Far into pc.ram, where the slowed background has not been yet: data and zero pages.
    const wanted = [ram.pages - 3, ram.pages - 40, ram.pages - 77, ram.pages - 200, ram.pages - 301];
    const { dest, stats, sink } = await restore({ faultAround: 8, backgroundRate: 2 * 1024 * 1024 }, {
      onPackage: (d) => {
        for (const p of wanted) d.request("pc.ram", p);
        d.request("/rom@etc/acpi/rsdp", 0); // an all-zero block: its page exists only if asked for
      },
    });
    expect(dest.errors).toEqual([]);
    expect(dest.machine).toBe("pc-i440fx-10.0");
    expect(dest.deviceState!.equals(DEVICE)).toBe(true);
    expect(dest.blocks).toEqual(gen.blocks.map((b) => ({ name: b.name, usedLength: b.usedLength })));
    checkPages(dest.records);
    const pre = dest.records.filter((r) => r.channel === "preempt");
    for (const p of wanted) expect(pre.some((r) => r.block === "pc.ram" && r.page === p), `request ${p} on preempt`).toBe(true);
    expect(pre.some((r) => r.block === "/rom@etc/acpi/rsdp" && r.page === 0 && r.zero)).toBe(true);
    // Fault-around: the other preempt pages are data pages in the requests' aligned windows.
    for (const r of pre) {
      if (r.block !== "pc.ram" || wanted.includes(r.page)) continue;
      expect(wanted.some((w) => Math.floor(w / 8) === Math.floor(r.page / 8)), `page ${r.page} outside every window`).toBe(true);
      expect(r.zero).toBe(false);
    }
    // Zero pages only on request: the one asked for, and any zero page among those requested.
    const zeros = dest.records.filter((r) => r.zero);
    expect(zeros.every((r) => (r.block === "pc.ram" && wanted.includes(r.page)) || r.block === "/rom@etc/acpi/rsdp")).toBe(true);
    expect(stats.pagesOnRequest + stats.pagesBackground + stats.pagesPrefetched + (sink.totalPages - sink.sentPages)).toBe(sink.totalPages);
    expect(stats.requests).toBe(wanted.length + 1);
  }, 30_000);

  test("without preempt: prefetch goes first, in the shared prefetch order; after a request the background continues right after it", async () => {
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    const ramIndex = gen.blocks.indexOf(ram);
    const dataPages = (from: number, count: number) => {
      const out: number[] = [];
      for (let p = from; p < ram.pages && out.length < count; p++) if (isData("pc.ram", p)) out.push(p);
      return out;
    };
    // Pages the linear sweep would take late: the working set goes first (the shared prefetch
    // order: recorded order step by step, each step sorted).
    const prefetch = dataPages(500, 5).reverse();
    const base = gen.blocks.slice(0, ramIndex).reduce((n, b) => n + b.pages, 0);
    const target = dataPages(ram.pages - 200, 1)[0]!;
    let asked = false;
    const { dest } = await restore(
      { preempt: false, faultAround: 1, backgroundRate: 2 * 1024 * 1024, prefetch: Uint32Array.from(prefetch, (page) => base + page) },
      {
        onRecord: (d, r) => {
          // Once the background runs (a few records in), the guest asks for a page far ahead.
          if (!asked && r.seq === 70) {
            asked = true;
            d.request("pc.ram", target);
          }
        },
      },
    );
    expect(dest.errors).toEqual([]);
    checkPages(dest.records);
    expect(dest.records.slice(0, prefetch.length).map((r) => r.page)).toEqual([...prefetch].sort((a, b) => a - b));
    const answer = dest.records.find((r) => r.block === "pc.ram" && r.page === target)!;
    expect(answer.channel).toBe("main");
    // The section after the answer's starts where the request left off.
    const next = dest.records.find((r) => r.section === answer.section! + 1)!;
    expect(next.block).toBe("pc.ram");
    expect(next.page).toBe(dataPages(target + 1, 1)[0]!);
  }, 30_000);
});

describe("QEMU sink: the background waits for the guest to run", () => {
  test("backgroundAfter: requests are answered at once, no background page goes before it resolves; then every data page once", async () => {
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    const target = ram.pages - 3;
    let release!: () => void;
    const running = new Promise<void>((r) => (release = r));
    let released = false;
    let mainBefore = 0;
    const { dest, stats } = await restore({ backgroundAfter: running }, {
      onPackage: (d) => d.request("pc.ram", target),
      onRecord: (_d, r) => {
        if (released) return;
        if (r.channel === "main") mainBefore++;
        // The request's answer arrived while the background was held: the guest "runs" now.
        if (r.channel === "preempt" && r.block === "pc.ram" && r.page === target) {
          released = true;
          release();
        }
      },
    });
    expect(dest.errors).toEqual([]);
    expect(released).toBe(true);
    expect(mainBefore).toBe(0);
    expect(stats.pagesBackground).toBeGreaterThan(0);
    checkPages(dest.records);
  }, 30_000);
});

describe("QEMU sink from remote sources (the snapshot file served or pushed whole)", () => {
  let tokenFile: string;
  beforeAll(() => {
    tokenFile = join(tmp.path, "token");
    writeFileSync(tokenFile, "qemu-sink-remote-test-token-5e1f\n", { mode: 0o600 });
  });

  /** Restores from `file`; the stand-in checks every page; `onRecord` (or `beforeRun`, once the file's structure is read) may disturb the source. */
  async function restoreRemote(file: RemoteFile, standin: StandinOptions, opts: Partial<SinkOptions> = {}, beforeRun?: () => void) {
    const snap = await readRemoteSnapshot(file);
    beforeRun?.();
    expect(snap.stream.refusals).toEqual([]);
    expect(Buffer.from(snap.deviceState).equals(Buffer.from(readDeviceState(stream)))).toBe(true);
    const path = join(tmp.path, `dst-${n++}.sock`);
    const dest = new StandinDestination(path, standin);
    await dest.listen();
    const sink = new QemuPageSink(
      snap.stream.ram.blocks.map((b) => ({ name: b.name, usedLength: b.usedLength })),
      (arrivals) => remotePages(file, snap.stream.ram.blocks, snap.zero, arrivals),
      { sectionId: snap.stream.ramSectionId, header: snap.stream.header, deviceState: snap.deviceState, pageSizeSummary: 4096, preempt: true, faultAround: 8, logger: silentLogger, ...opts },
    );
    try {
      const stats = await sink.run({ kind: "unix", path });
      await dest.done;
      return { dest, stats };
    } finally {
      dest.close();
      file.close();
    }
  }

  test("tcp://: page-server --whole-file, killed and restarted mid-restore; requests forwarded urgently; every page once, as in the file", async () => {
    let ps: PageServerProc | undefined = await startPageServer(["--mem", gen.path, "--whole-file", "--token-file", tokenFile, "--log-format", "json"]);
    const port = ps.port;
    const log = eventLog();
    const file = await openRemoteFile(`tcp://127.0.0.1:${port}`, { tokenFile, deadlineMs: 20_000, logger: log.logger });
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    const late = [ram.pages - 5, ram.pages - 150];
    let restarted: Promise<void> | undefined;
    try {
      const { dest, stats } = await restoreRemote(file, {
        onPackage: (d) => d.request("pc.ram", ram.pages - 60),
        onRecord: (d, r) => {
          if (r.seq !== 40 || restarted) return;
          // Mid-restore: the page server dies; the guest asks for pages while it is away.
          const dying = ps!;
          ps = undefined;
          restarted = (async () => {
            dying.daemon.proc.kill("SIGKILL");
            await dying.daemon.proc.exited;
            for (const p of late) d.request("pc.ram", p);
            // Back only once the restore noticed it gone: what it asks meanwhile stays owed.
            await log.next((e) => e.event === "remote.lost");
            ps = await startPageServer(["--mem", gen.path, "--whole-file", "--token-file", tokenFile, "--log-format", "json"], port);
          })();
        },
      }, { backgroundRate: 1024 * 1024 });
      expect(restarted, "the page server was killed mid-restore").toBeDefined();
      await restarted;
      expect(dest.errors).toEqual([]);
      checkPages(dest.records);
      const pre = dest.records.filter((r) => r.channel === "preempt");
      for (const p of [ram.pages - 60, ...late]) expect(pre.some((r) => r.block === "pc.ram" && r.page === p), `request ${p} on preempt`).toBe(true);
      expect(stats.requests).toBe(3);
      // The INFO flag keeps the two kinds apart: a daemon does not restore a VM from a file's bytes,
      // and qemu-restore does not take one block's pages for the whole file.
      await expect(openSource(`tcp://127.0.0.1:${port}`, { tokenFile, deadlineMs: 5000, logger: silentLogger })).rejects.toThrow(/serves a whole snapshot file/);
      const plain = await startPageServer(["--mem", gen.path, "--token-file", tokenFile, "--log-format", "json"]);
      try {
        await expect(openRemoteFile(`tcp://127.0.0.1:${plain.port}`, { tokenFile, deadlineMs: 5000, logger: silentLogger })).rejects.toThrow(/start it with --whole-file/);
      } finally {
        await plain.daemon.stop();
      }
    } finally {
      await ps?.daemon.stop();
    }
  }, 60_000);

  /** A logger that keeps every event, and resolves a wait when one matches. */
  function eventLog() {
    const events: Record<string, unknown>[] = [];
    const waits: { match: (e: Record<string, unknown>) => boolean; resolve: (e: Record<string, unknown>) => void }[] = [];
    const logger = new Logger("debug", {
      format: "json",
      sink: (line) => {
        const e = JSON.parse(line) as Record<string, unknown>;
        events.push(e);
        for (const w of [...waits]) if (w.match(e)) waits.splice(waits.indexOf(w), 1) && w.resolve(e);
      },
    });
    const next = (match: (e: Record<string, unknown>) => boolean) =>
      new Promise<Record<string, unknown>>((resolve) => {
        const seen = events.find(match);
        if (seen) resolve(seen);
        else waits.push({ match, resolve });
      });
    return { logger, events, next };
  }

  test("tcp://: page server frozen (SIGSTOP) while it owes the restore: its silence is noticed (pinged, no reply, connections dropped) well before the deadline, and once it continues the restore completes, every page once, as in the file", async () => {
    const ps = await startPageServer(["--mem", gen.path, "--whole-file", "--token-file", tokenFile, "--log-format", "json"]);
    const log = eventLog();
    // Silence is given up after half the deadline (pinged at a quarter), well before the deadline.
    const file = await openRemoteFile(`tcp://127.0.0.1:${ps.port}`, { tokenFile, deadlineMs: 8000, logger: log.logger });
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    let resumed: Promise<void> | undefined;
    try {
      const { dest, stats } = await restoreRemote(file, {
        // The guest asks while the page server is frozen: the request stays owed.
        onPackage: (d) => d.request("pc.ram", ram.pages - 60),
      }, {}, () => {
        // Frozen, not killed: its sockets stay open, the kernel still accepts connections, nothing answers.
        ps.daemon.proc.kill("SIGSTOP");
        resumed = (async () => {
          const lost = await log.next((e) => e.event === "remote.lost");
          ps.daemon.proc.kill("SIGCONT");
          expect(lost.kind).toBe("timeout");
          expect(String(lost.reason)).toMatch(/^no reply for \d+\.\d s$/);
        })();
      });
      await resumed;
      expect(dest.errors).toEqual([]);
      checkPages(dest.records);
      expect(dest.records.some((r) => r.channel === "preempt" && r.block === "pc.ram" && r.page === ram.pages - 60)).toBe(true);
      expect(stats.requests).toBe(1);
      const back = log.events.find((e) => e.event === "remote.back");
      expect(back, "remote.back after the freeze").toBeDefined();
      expect(back!.vm).toBeUndefined();
      expect(Number(back!.stalledMs)).toBeLessThan(8000);
      expect(file.report!().fields.reconnects).toBe(1);
    } finally {
      ps.daemon.proc.kill("SIGCONT");
      await ps.daemon.stop();
    }
  }, 60_000);

  test("tcp://: page server frozen for good: the restore fails at the deadline with a clear error, and nothing wrong was sent before", async () => {
    const ps = await startPageServer(["--mem", gen.path, "--whole-file", "--token-file", tokenFile, "--log-format", "json"]);
    const log = eventLog();
    const deadlineMs = 3000;
    const file = await openRemoteFile(`tcp://127.0.0.1:${ps.port}`, { tokenFile, deadlineMs, logger: log.logger });
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    let dest: StandinDestination | undefined;
    let frozenAt = 0;
    try {
      const run = restoreRemote(file, {
        onPackage: (d) => {
          dest = d;
          d.request("pc.ram", ram.pages - 60);
        },
      }, {}, () => {
        ps.daemon.proc.kill("SIGSTOP");
        frozenAt = performance.now();
      });
      await expect(run).rejects.toThrow(/page server tcp:\/\/127\.0\.0\.1:\d+ (for|delivered nothing for) 3000 ms \(last: .*\); \d+ requests unanswered|no page server at tcp:\/\/127\.0\.0\.1:\d+ for 3000 ms \(last: .*\); \d+ requests unanswered/);
      const failedAfter = performance.now() - frozenAt;
      expect(failedAfter).toBeGreaterThanOrEqual(deadlineMs - 250);
      expect(failedAfter).toBeLessThan(deadlineMs + 5000); // not a hang (the margin is for a loaded machine)
      // It noticed the silence (pings unanswered) before the deadline, and said so.
      const lost = log.events.find((e) => e.event === "remote.lost");
      expect(lost?.kind).toBe("timeout");
      expect(String(lost?.reason)).toMatch(/^no reply for /);
      expect(dest, "the destination got the device state").toBeDefined();
      expect(dest!.errors).toEqual([]);
      checkPages(dest!.records, false);
      expect(dest!.records.some((r) => !r.zero), "no data page without the page server").toBe(false);
    } finally {
      ps.daemon.proc.kill("SIGKILL");
      await ps.daemon.proc.exited;
    }
  }, 60_000);

  test("file://: push --whole-file, then every page once, as in the file (chunks hash-verified); a one-block push is refused clearly", async () => {
    const store = `file://${join(tmp.path, "store")}`;
    await push(gen.path, `${store}/whole`, { wholeFile: true });
    const file = await openRemoteFile(`${store}/whole`, { deadlineMs: 10_000, logger: silentLogger, cacheDir: join(tmp.path, "cache") });
    const ram = gen.blocks.find((b) => b.name === "pc.ram")!;
    const { dest } = await restoreRemote(file, { onPackage: (d) => d.request("pc.ram", ram.pages - 9) });
    expect(dest.errors).toEqual([]);
    checkPages(dest.records);
    expect(dest.records.some((r) => r.channel === "preempt" && r.page === ram.pages - 9)).toBe(true);

    await expect(openSource(`${store}/whole`, { deadlineMs: 5000, logger: silentLogger, cacheDir: join(tmp.path, "cache") })).rejects.toThrow(/not guest memory/);
    await push(gen.path, `${store}/block`);
    await expect(openRemoteFile(`${store}/block`, { deadlineMs: 10_000, logger: silentLogger, cacheDir: join(tmp.path, "cache") })).rejects.toThrow(/--whole-file/);
  }, 60_000);

  test("file://: a read past the file's last page is refused, as tcp:// refuses it (it threw a bare RangeError from an empty copy)", async () => {
    const store = `file://${join(tmp.path, "store-bounds")}`;
    await push(gen.path, `${store}/whole`, { wholeFile: true });
    const file = await openRemoteFile(`${store}/whole`, { deadlineMs: 5000, logger: silentLogger, cacheDir: join(tmp.path, "cache-bounds") });
    try {
      const pages = Math.ceil(file.size / 4096);
      expect((await file.read((pages - 1) * 4096, 4096, true)).length).toBe(4096);
      const past = await Promise.race([file.read(pages * 4096, 4096, true).then(() => "resolved", (e: Error) => e.message), Bun.sleep(3000).then(() => "hung")]);
      expect(past).toContain("whole pages");
      const unaligned = await file.read(100, 4096, true).then(() => "resolved", (e: Error) => e.message);
      expect(unaligned).toContain("whole pages");
    } finally {
      file.close();
    }
  }, 60_000);

  test("page-server --mem STORE/NAME refuses a file pushed --whole-file (served as guest memory, a daemon would take the file's bytes for its VM's pages)", async () => {
    const store = `file://${join(tmp.path, "store-served")}`;
    await push(gen.path, `${store}/whole`, { wholeFile: true });
    await expect(openServedStore(`${store}/whole`, { deadlineMs: 5000, logger: silentLogger, cacheDir: join(tmp.path, "cache-served") })).rejects.toThrow(/not guest memory/);
  }, 60_000);
});
