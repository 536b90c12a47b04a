// The postcopy client's request bookkeeping (src/postcopy/request-queues.ts, in-flight.ts), on a
// real handler table: which request goes out next, how requests are cut and merged, when a
// page may be hurried, and what a lost connection gives back. The whole client, over real
// sockets to a real page server, is tested in postcopy*.test.ts.
import { describe, expect, test } from "bun:test";
import { InFlight } from "../src/postcopy/in-flight.ts";
import { type PageRequest, RequestQueues } from "../src/postcopy/request-queues.ts";
import { HandlerTable } from "../src/scheduler/handler-table.ts";
import { IMAGE_PAGE, ZeroMap } from "../src/sources/image/snapshot-image.ts";
import type { RemoteBackend } from "../src/sources/port.ts";

const SLOT = 16 * IMAGE_PAGE;

/** One 4 KiB-page region of 256 pages at image offset 0; `zero` lists the zero image pages. */
function setup(zeroPages: number[] = []) {
  const zero = new ZeroMap(256);
  for (const p of zeroPages) zero.setZero(p);
  const backend: RemoteBackend = { kind: "remote", size: 256 * IMAGE_PAGE, zero, description: "test" };
  const table = new HandlerTable([{ base: 0x1000_0000, size: 256 * IMAGE_PAGE, offset: 0, pageSize: IMAGE_PAGE }], backend);
  const region = table.regions[0]!;
  return { region, queues: new RequestQueues(table.regions, SLOT, zero) };
}

const spans = (reqs: { first: number; count: number }[]) => reqs.map((r) => [r.first, r.count]);

describe("request queues", () => {
  test("a run is cut into slot-sized requests, with increasing ids and its image byte range", () => {
    const { region, queues } = setup();
    expect(queues.add(region, 10, 40, true, false)).toBe(true);
    expect(spans(queues.urgent)).toEqual([[10, 16], [26, 16], [42, 8]]);
    expect(queues.urgent.map((r) => r.id)).toEqual([1, 2, 3]);
    expect(queues.urgent[1]!.start).toBe(26 * IMAGE_PAGE);
    expect(queues.urgent[1]!.bytes).toBe(16 * IMAGE_PAGE);
    expect(queues.nextId).toBe(4);
  });

  test("background: fault-around and prefetch go out before the sweep's; sweep bytes are counted", () => {
    const { region, queues } = setup();
    queues.add(region, 100, 4, false, true);
    queues.add(region, 200, 2, false, false);
    expect(queues.sweepBytes).toBe(4 * IMAGE_PAGE);
    expect(spans([queues.nextBackground()!])).toEqual([[200, 2]]);
    expect(queues.sweepBytes).toBe(4 * IMAGE_PAGE);
    expect(spans([queues.nextBackground()!])).toEqual([[100, 4]]);
    expect(queues.sweepBytes).toBe(0);
    expect(queues.nextBackground()).toBeUndefined();
  });

  test("a queued background request grows over zero pages only, up to a slot, never once sent", () => {
    const { region, queues } = setup([4, 5, 30]);
    queues.add(region, 0, 4, false, true);
    // Pages 4 and 5 are zero: [6, 8) joins [0, 4) as one request, and nothing new is queued.
    expect(queues.add(region, 6, 2, false, true)).toBe(false);
    expect(spans(queues.sweep)).toEqual([[0, 8]]);
    expect(queues.sweepBytes).toBe(8 * IMAGE_PAGE);
    // Page 8 is data: a gap of data pages starts a new request.
    expect(queues.add(region, 9, 1, false, true)).toBe(true);
    expect(spans(queues.sweep)).toEqual([[0, 8], [9, 1]]);
    // Past a slot's worth: a new request even over zero pages.
    const { region: r2, queues: q2 } = setup([30]);
    q2.add(r2, 15, 15, false, false);
    expect(q2.add(r2, 31, 1, false, false)).toBe(true);
    expect(spans(q2.background)).toEqual([[15, 15], [31, 1]]);
    // A sent request is never grown.
    const { region: r3, queues: q3 } = setup([4]);
    q3.add(r3, 0, 4, false, false);
    q3.background[0]!.sent = true;
    expect(q3.add(r3, 5, 1, false, false)).toBe(true);
    // Urgent requests are never merged.
    const { region: r4, queues: q4 } = setup([4]);
    q4.add(r4, 0, 4, true, false);
    q4.add(r4, 5, 1, true, false);
    expect(spans(q4.urgent)).toEqual([[0, 4], [5, 1]]);
  });

  test("a page is hurried once while an urgent request covers it, again once that request is finished", () => {
    const { region, queues } = setup();
    queues.add(region, 50, 4, false, false);
    expect(queues.hurry(region, 51, false)).toBe(true);
    expect(queues.hurry(region, 51, false)).toBe(false);
    expect(spans(queues.urgent)).toEqual([[51, 1]]);
    // Pages of an urgent fault request need no hurry either.
    queues.add(region, 60, 2, true, false);
    expect(queues.hurry(region, 61, false)).toBe(false);
    const hurried = queues.urgent.shift()!;
    queues.finished(hurried);
    expect(queues.hurry(region, 51, false)).toBe(true);
    // Finishing a background request does not clear an urgent one's pages.
    queues.finished(queues.background[0]!);
    expect(queues.hurry(region, 51, false)).toBe(false);
  });

  test("what a lost connection owed goes back first, in the order it was asked for; drain empties every queue", () => {
    const { region, queues } = setup();
    const inFlight = new InFlight<PageRequest>();
    queues.add(region, 0, 48, false, false); // ids 1..3
    queues.add(region, 100, 1, true, false); // id 4
    queues.add(region, 120, 16, false, true); // id 5, the sweep's
    const sent = [queues.nextBackground()!, queues.nextBackground()!, queues.urgent.shift()!];
    for (const r of sent) inFlight.add(r);
    expect(inFlight.size).toBe(3);
    expect(inFlight.owes(true)).toBe(true);
    expect(inFlight.backgroundBytes).toBe(32 * IMAGE_PAGE);
    // The background connection is lost: its two requests, oldest first, ahead of what waits.
    const again = inFlight.takeBack(false);
    expect(again.map((r) => r.id)).toEqual([1, 2]);
    expect(again.every((r) => !r.sent)).toBe(true);
    expect(inFlight.owes(false)).toBe(false);
    expect(inFlight.owes(true)).toBe(true);
    queues.putBack(false, again);
    expect(queues.background.map((r) => r.id)).toEqual([1, 2, 3]);
    expect(queues.nextBackground()!.id).toBe(1);
    // A reply completes the urgent one; removing it twice changes nothing.
    inFlight.remove(sent[2]!);
    inFlight.remove(sent[2]!);
    expect(inFlight.urgent).toBe(0);
    expect(inFlight.size).toBe(0);
    expect(queues.drain().map((r) => r.id)).toEqual([2, 3, 5]);
    expect(queues.sweepBytes).toBe(0);
    expect(queues.background.length + queues.sweep.length + queues.urgent.length).toBe(0);
  });
});
