import { describe, expect, test } from "bun:test";
import { readdirSync, readlinkSync } from "node:fs";
import { EventLoop } from "../src/core/event-loop.ts";
import { warmUpPostcopy } from "../src/daemon/postcopy-warmup.ts";

/** This process's open fds and what they are (sockets, anon inodes, files). */
function openFds(): string[] {
  const out: string[] = [];
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      out.push(`${fd} ${readlinkSync(`/proc/self/fd/${fd}`)}`);
    } catch {
      // the directory's own fd, closed by now
    }
  }
  return out.sort();
}

describe("postcopy JIT warm-up", () => {
  test("serves whole rounds over loopback, checks every byte, and leaves no fd, socket or timer behind", async () => {
    const loop = new EventLoop();
    try {
      const before = openFds();
      const r = await warmUpPostcopy(loop, 60_000, 3, 60_000);
      expect(r).toBeDefined();
      expect(r!.reason).toBeUndefined();
      expect(r!.ok).toBe(true);
      // Bounded by rounds here (the budget is large): every round installed the whole 2 MiB image.
      expect(r!.rounds).toBe(3);
      expect(r!.pages).toBe(3 * 512);
      expect(r!.requests).toBeGreaterThan(3);
      expect(openFds()).toEqual(before);
      // The loop is the daemon's next: reusable, and no timer of the warm-up fires in it later.
      let fired = 0;
      loop.after(5, () => {
        fired++;
        loop.stop();
      });
      await loop.run();
      expect(fired).toBe(1);
      expect(openFds()).toEqual(before);
    } finally {
      loop.close();
    }
  });

  test("a budget bounds it: rounds stop once it is spent", async () => {
    const loop = new EventLoop();
    try {
      const r = await warmUpPostcopy(loop, 0, 1000, 60_000);
      // The first round always completes; the budget (0) is spent by then.
      expect(r!.ok).toBe(true);
      expect(r!.rounds).toBe(1);
    } finally {
      loop.close();
    }
  });

  test("a round cut short by the hard deadline is abandoned cleanly (and said so)", async () => {
    const loop = new EventLoop();
    try {
      const before = openFds();
      // 0 ms: the deadline fires at the loop's first turn, long before the handshakes are through.
      const r = await warmUpPostcopy(loop, 0, 1000, 0);
      expect(r!.ok).toBe(false);
      expect(r!.rounds).toBe(0);
      expect(r!.reason).toContain("not done within 0 ms");
      expect(openFds()).toEqual(before);
    } finally {
      loop.close();
    }
  });
});
