import { describe, expect, test } from "bun:test";
import { EventLoop } from "../src/core/event-loop.ts";
import { SpinPolicy } from "../src/core/spin-policy.ts";
import { warmUpDispatch, warmUpRealFaults } from "../src/daemon/warmup.ts";

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
});
