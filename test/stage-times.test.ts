// The per-stage sample behind the `remote.urgent_stages` event: exact percentiles while the
// sample holds everything, bounded memory past it, and requests missing a stage left out.
import { expect, test } from "bun:test";
import { STAGE_SAMPLES, StageTimes } from "../src/postcopy/stage-times.ts";

const US = 1000;

test("percentiles and max per stage, from the marks of each request", () => {
  const t = new StageTimes();
  // Request i: queued i µs, round trip 2i, receive 3i, install 4i (i = 1..100).
  for (let i = 1; i <= 100; i++) {
    const created = 1_000_000 * i;
    const sent = created + i * US;
    const header = sent + 2 * i * US;
    const opened = header + 3 * i * US;
    t.record({ created, sent, header, opened }, opened + 4 * i * US);
  }
  const s = t.summary();
  expect(s.count).toBe(100);
  expect(s.us.queue).toEqual([50, 99, 100]);
  expect(s.us.server).toEqual([100, 198, 200]);
  expect(s.us.receive).toEqual([150, 297, 300]);
  expect(s.us.install).toEqual([200, 396, 400]);
  expect(s.us.total).toEqual([500, 990, 1000]);
});

test("a request re-sent or never answered (a mark missing) is not counted", () => {
  const t = new StageTimes();
  t.record({ created: 1, sent: 0, header: 0, opened: 0 }, 5);
  t.record({ created: 1, sent: 2, header: 3, opened: 0 }, 5);
  expect(t.count).toBe(0);
  expect(t.summary().us.total).toEqual([0, 0, 0]);
});

test("past the sample size the max is still exact and the percentiles come from a uniform sample", () => {
  const t = new StageTimes();
  const n = STAGE_SAMPLES * 4;
  for (let i = 0; i < n; i++) t.record({ created: 0, sent: US, header: 2 * US, opened: 3 * US }, (i === n - 1 ? 10_000 : 4) * US);
  const s = t.summary();
  expect(s.count).toBe(n);
  expect(s.us.total).toEqual([4, 4, 10_000]);
  expect(s.us.install[2]).toBe(9997);
});
