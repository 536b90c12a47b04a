// The scheduling policies both sinks share (src/scheduler/): the sweep's order over units and
// passes, the working set's step order, and the fault-around window.
import { describe, expect, test } from "bun:test";
import { windowEnd, windowStart } from "../src/scheduler/fault-window.ts";
import { PREFETCH_STEP_PAGES, PrefetchOrder } from "../src/scheduler/prefetch-order.ts";
import { SweepOrder } from "../src/scheduler/sweep-order.ts";

/** Every span `next` proposes until the end of the pass, as [unit, from, to]. */
function pass(s: SweepOrder, done?: (u: number) => boolean): [number, number, number][] {
  const out: [number, number, number][] = [];
  while (s.next(done)) out.push([s.unit, s.from, s.to]);
  return out;
}

describe("SweepOrder", () => {
  const sizes = [10, 0, 5];
  const make = () => new SweepOrder(sizes.length, (u) => sizes[u]!, (u) => (u === 0 ? 4 : 3));

  test("one pass covers every page of every unit in spans, then the next pass starts over", () => {
    const s = make();
    expect(pass(s)).toEqual([[0, 0, 4], [0, 4, 8], [0, 8, 10], [2, 0, 3], [2, 3, 5]]);
    expect(s.passes).toBe(2);
    expect(pass(s)[0]).toEqual([0, 0, 4]);
  });

  test("follow jumps to the page after the guest's; the pages jumped over come in the next pass", () => {
    const s = make();
    expect(s.next()).toBe(true);
    s.follow(2, 1);
    expect(pass(s)).toEqual([[2, 1, 4], [2, 4, 5]]);
    expect(pass(s).map((x) => x[0])).toContain(0);
  });

  test("again proposes the same span; skipUnit and done skip the rest of a unit", () => {
    const s = make();
    s.next();
    s.again();
    s.next();
    expect([s.unit, s.from, s.to]).toEqual([0, 0, 4]);
    s.skipUnit();
    s.next();
    expect([s.unit, s.from]).toEqual([2, 0]);
    expect(pass(make(), (u) => u === 0)).toEqual([[2, 0, 3], [2, 3, 5]]);
  });
});

describe("PrefetchOrder", () => {
  test("the recorded order step by step, each step sorted; retry gives a step back", () => {
    const recorded = Uint32Array.from({ length: PREFETCH_STEP_PAGES + 3 }, (_, i) => 1000 - i);
    const o = new PrefetchOrder(recorded);
    const first = [...o.step()];
    expect(first.length).toBe(PREFETCH_STEP_PAGES);
    expect(first).toEqual([...recorded.subarray(0, PREFETCH_STEP_PAGES)].sort((a, b) => a - b));
    o.retry(first.length);
    expect([...o.step()]).toEqual(first);
    expect([...o.step()]).toEqual([870, 871, 872]);
    expect(o.done).toBe(true);
  });
});

describe("fault-around window", () => {
  test("the aligned window holding the fault, at least the fault's span, within the unit", () => {
    expect(windowStart(13, 8)).toBe(8);
    expect(windowEnd(8, 14, 8, 100)).toBe(16);
    expect(windowEnd(8, 20, 8, 100)).toBe(20); // a span longer than the window
    expect(windowEnd(96, 97, 8, 100)).toBe(100); // clipped at the end
    expect([windowStart(13, 1), windowEnd(13, 14, 1, 100)]).toEqual([13, 14]); // 1 = the page alone
  });
});
