import { describe, expect, test } from "bun:test";
import { SpinPolicy } from "../src/core/spin-policy.ts";

describe("SpinPolicy", () => {
  test("never spins when disabled or after an idle turn", () => {
    expect(new SpinPolicy(0).budget(true)).toBe(0);
    const p = new SpinPolicy(50);
    expect(p.budget(false)).toBe(0);
    expect(p.budget(true)).toBe(50);
  });

  test("keeps spinning while spins catch the next event", () => {
    const p = new SpinPolicy(50);
    for (let i = 0; i < 1000; i++) {
      expect(p.budget(true)).toBe(50);
      p.hit();
    }
    expect(p.hits).toBe(1000);
  });

  test("stops after two misses in a row, then probes at doubling intervals", () => {
    const p = new SpinPolicy(50);
    expect(p.budget(true)).toBe(50);
    p.miss();
    expect(p.budget(true)).toBe(50);
    p.miss();
    // Backed off: the next 16 active sleeps do not spin, the 17th probes.
    const gaps: number[] = [];
    let sinceSpin = 0;
    for (let i = 0; i < 16 + 32 + 64 + 3; i++) {
      if (p.budget(true) > 0) {
        gaps.push(sinceSpin);
        sinceSpin = 0;
        p.miss();
      } else sinceSpin++;
    }
    expect(gaps).toEqual([16, 32, 64]);
  });

  test("a probe that hits restores spinning at once", () => {
    const p = new SpinPolicy(50);
    p.miss();
    p.miss();
    let i = 0;
    while (p.budget(true) === 0) i++;
    expect(i).toBe(16);
    p.hit();
    expect(p.budget(true)).toBe(50);
    expect(p.budget(true)).toBe(50);
  });

  test("the probe interval is bounded", () => {
    const p = new SpinPolicy(50);
    let spins = 0;
    for (let i = 0; i < 100_000; i++) {
      if (p.budget(true) > 0) {
        spins++;
        p.miss();
      }
    }
    // 2 + probes after 16, 32, ..., 4096, then every 4096: far fewer than 1% of the turns.
    expect(spins).toBeGreaterThan(2 + 9);
    expect(spins).toBeLessThan(2 + 9 + 100_000 / 4096 + 2);
  });
});
