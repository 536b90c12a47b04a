import { describe, expect, test } from "bun:test";
import { mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { EventLoop } from "../src/core/event-loop.ts";
import { Logger } from "../src/core/log.ts";
import { SpinPolicy } from "../src/core/spin-policy.ts";
import { warmUpDispatch, warmUpRealFaults } from "../src/daemon/warmup.ts";
import { push } from "../src/sources/store/push.ts";
import { openStoreSource } from "../src/sources/store/store-source.ts";
import { writeGuestLikeImage } from "./store-helpers.ts";
import { tempDir } from "./harness.ts";

describe("JIT warm-up", () => {
  test("the synthetic pass serves every fault it feeds", () => {
    expect(warmUpDispatch(3)).toBe(3 * 64);
  });

  test("the real pass serves a thread's faults through the event loop, every round", async () => {
    const loop = new EventLoop();
    loop.spin = new SpinPolicy(50);
    try {
      expect(await warmUpRealFaults(loop, 5)).toBe(5 * 64);
      // The loop is reusable afterwards (the daemon runs it next), and the spin path ran.
      expect(loop.spin.hits + loop.spin.misses).toBeGreaterThan(0);
      let fired = false;
      loop.after(1, () => {
        fired = true;
        loop.stop();
      });
      await loop.run();
      expect(fired).toBe(true);
    } finally {
      loop.close();
    }
  });

  test("a store source's requester is warmed up too, over chunks of its own: every fault served, nothing fetched or written to the host cache, its files removed", async () => {
    const dir = tempDir();
    const loop = new EventLoop();
    const tmpBefore = process.env.TMPDIR;
    try {
      const image = join(dir.path, "vm.mem");
      writeGuestLikeImage(image, 4 * 1024 * 1024, 3);
      await push(image, `file://${dir.path}/store/vm`, { chunkSize: 256 * 1024 });
      const cacheDir = join(dir.path, "cache");
      const lines: string[] = [];
      const logger = new Logger("debug", { sink: (l) => lines.push(l) });
      const opened = await openStoreSource(`file://${dir.path}/store/vm`, { cacheDir, deadlineMs: 1000, logger });
      try {
        expect(opened.source.kind).toBe("remote");
        if (opened.source.kind !== "remote") return;
        // Where the warm-up keeps its chunks while it runs.
        const tmp = join(dir.path, "tmp");
        mkdirSync(tmp);
        process.env.TMPDIR = tmp;
        const remote = { source: opened.source, loop, logger };
        expect(warmUpDispatch(3, remote)).toBe(3 * 64);
        expect(await warmUpRealFaults(loop, 5, remote)).toBe(5 * 64);
        expect(readdirSync(tmp)).toEqual([]);
        expect(readdirSync(join(cacheDir, "chunks"))).toEqual([]);
        expect(lines.filter((l) => / (warn|error): /.test(l))).toEqual([]);
      } finally {
        opened.close();
      }
    } finally {
      if (tmpBefore === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = tmpBefore;
      loop.close();
      dir.cleanup();
    }
  });
});
