// EventLoop `first` fds: served before the other fds ready in the same turn (a fault or an urgent
// reply must not wait behind a bulk stream that epoll happens to list ahead of it).
import { expect, test } from "bun:test";
import { EventLoop } from "../src/core/event-loop.ts";
import { EPOLLIN, sl } from "../src/core/ffi.ts";
import { HALF_LIFE_MS, RecentWork } from "../src/core/recent-work.ts";

test("a `first` fd is dispatched before the others ready in the same turn, whatever epoll's order", async () => {
  const loop = new EventLoop();
  const order: string[] = [];
  const bulk = [sl.sl_eventfd(), sl.sl_eventfd()];
  const urgent = sl.sl_eventfd();
  const tokens: [number, number][] = [];
  const watch = (fd: number, name: string, first: boolean) => {
    tokens.push([loop.add(fd, EPOLLIN, () => {
      sl.sl_eventfd_drain(fd);
      order.push(name);
      if (order.length === 3) loop.stop();
    }, first), fd]);
  };
  watch(bulk[0]!, "bulk 0", false);
  watch(urgent, "urgent", true);
  watch(bulk[1]!, "bulk 1", false);
  // Ready in this order: epoll lists them so (its ready list is first come, first listed).
  sl.sl_eventfd_signal(bulk[0]!);
  sl.sl_eventfd_signal(bulk[1]!);
  sl.sl_eventfd_signal(urgent);
  await loop.run();
  expect(order).toEqual(["urgent", "bulk 0", "bulk 1"]);
  // A `first` fd removed and its token reused by a plain fd: that one is plain (served after a
  // `first` fd of the same turn), and every ready fd is still served once.
  loop.remove(tokens[1]![0], urgent);
  tokens.splice(1, 1);
  order.length = 0;
  const urgent2 = sl.sl_eventfd();
  watch(urgent, "plain", false);
  watch(urgent2, "urgent", true);
  sl.sl_eventfd_signal(urgent);
  sl.sl_eventfd_signal(urgent2);
  sl.sl_eventfd_signal(bulk[0]!);
  await loop.run();
  expect(order[0]).toBe("urgent");
  expect(order.slice(1).sort()).toEqual(["bulk 0", "plain"]);
  for (const [token, fd] of tokens) {
    loop.remove(token, fd);
    sl.sl_close(fd);
  }
  loop.close();
});

test("a `first` handler that removes its fd, whose token a plain fd then takes, does not get that fd served twice", async () => {
  const loop = new EventLoop();
  const served: string[] = [];
  const bulk = sl.sl_eventfd();
  const urgent = sl.sl_eventfd();
  const plain = sl.sl_eventfd();
  let plainToken = -1;
  const bulkToken = loop.add(bulk, EPOLLIN, () => {
    sl.sl_eventfd_drain(bulk);
    served.push("bulk");
    loop.stop();
  });
  const urgentToken = loop.add(urgent, EPOLLIN, () => {
    served.push("urgent");
    loop.remove(urgentToken, urgent);
    // The freed token goes to a new, plain fd that is not ready.
    plainToken = loop.add(plain, EPOLLIN, () => served.push("plain"));
  }, true);
  sl.sl_eventfd_signal(bulk);
  sl.sl_eventfd_signal(urgent);
  await loop.run();
  expect(plainToken).toBe(urgentToken);
  // Before: the urgent fd's event, listed again in the second pass, ran the plain fd's handler.
  expect(served).toEqual(["urgent", "bulk"]);
  loop.remove(bulkToken, bulk);
  loop.remove(plainToken, plain);
  for (const fd of [bulk, urgent, plain]) sl.sl_close(fd);
  loop.close();
});

test("an fd removed mid-turn, whose token a new fd takes, never hands its pending event to the new fd (one pass)", async () => {
  const loop = new EventLoop();
  const served: string[] = [];
  const a = sl.sl_eventfd();
  const b = sl.sl_eventfd();
  const c = sl.sl_eventfd();
  let bToken = -1;
  let cToken = -1;
  const aToken = loop.add(a, EPOLLIN, () => {
    sl.sl_eventfd_drain(a);
    served.push("a");
    // b is ready in this same turn, after a: remove it, and let c (not ready) take its token.
    loop.remove(bToken, b);
    cToken = loop.add(c, EPOLLIN, () => served.push("c"));
    loop.after(0, () => loop.stop());
  });
  bToken = loop.add(b, EPOLLIN, () => served.push("b"));
  sl.sl_eventfd_signal(a);
  sl.sl_eventfd_signal(b);
  await loop.run();
  expect(cToken).toBe(bToken);
  expect(served).toEqual(["a"]);
  loop.remove(aToken, a);
  loop.remove(cToken, c);
  for (const fd of [a, b, c]) sl.sl_close(fd);
  loop.close();
});

test("several `first` fds ready: the one with the least recent work first, a slice per turn, and one that becomes ready mid-turn goes ahead of the busy ones", async () => {
  const loop = new EventLoop();
  // 0: every contended turn serves one `first` fd, then epoll is asked again.
  loop.firstSliceMs = 0;
  const served: string[] = [];
  const heavy = [sl.sl_eventfd(), sl.sl_eventfd()];
  const small = sl.sl_eventfd();
  let signalledAfter = -1;
  const tokens: [number, number][] = [];
  // The heavy fds are never drained: level-triggered, they stay ready, as a VM streaming faults.
  heavy.forEach((fd, h) => {
    tokens.push([loop.add(fd, EPOLLIN, () => {
      served.push(`heavy ${h}`);
      // A small VM faults while a heavy one is being served.
      if (served.length === 3) {
        sl.sl_eventfd_signal(small);
        signalledAfter = served.length;
      }
      if (served.length === 9) loop.stop();
      return 64; // pages installed
    }, true), fd]);
  });
  tokens.push([loop.add(small, EPOLLIN, () => {
    sl.sl_eventfd_drain(small);
    served.push("small");
    return 1;
  }, true), small]);
  sl.sl_eventfd_signal(heavy[0]!);
  sl.sl_eventfd_signal(heavy[1]!);
  await loop.run();
  // Served right after the turn in which it became ready, not after every other ready fd.
  expect(served[signalledAfter]).toBe("small");
  expect(served.filter((s) => s === "small").length).toBe(1);
  // The heavy fds take turns: neither waits for the other to run dry.
  const h = served.filter((s) => s !== "small");
  for (let i = 1; i < h.length; i++) expect(h[i]).not.toBe(h[i - 1]);
  for (const [token, fd] of tokens) {
    loop.remove(token, fd);
    sl.sl_close(fd);
  }
  loop.close();
});

test("recent work: least first, halving every HALF_LIFE_MS; a new fd on a reused token starts from nothing", () => {
  const w = new RecentWork();
  const idx = new Int32Array([0, 1, 2]);
  // Event i is token i + 1.
  const tokenOf = (i: number) => i + 1;
  w.charge(1, 0, 100);
  w.charge(2, 0, 10);
  w.charge(3, 0, 50);
  w.order(idx, 3, tokenOf, 0);
  expect([...idx]).toEqual([1, 2, 0]);
  expect(w.decayed(1, HALF_LIFE_MS)).toBeCloseTo(50);
  // Busy long ago ranks below busy now.
  w.charge(2, 4 * HALF_LIFE_MS, 20);
  expect(w.decayed(1, 4 * HALF_LIFE_MS)).toBeCloseTo(100 / 16);
  idx.set([0, 1, 2]);
  w.order(idx, 3, tokenOf, 4 * HALF_LIFE_MS);
  expect([...idx]).toEqual([2, 0, 1]);
  w.reset(2);
  expect(w.decayed(2, 4 * HALF_LIFE_MS)).toBe(0);
  // Tokens past the first 64 grow the tables.
  w.reset(200);
  w.charge(200, 0, 3);
  expect(w.decayed(200, 0)).toBe(3);
});

test("a `first` handler that throws in a contended turn: run() rejects and the loop is not left contended", async () => {
  const loop = new EventLoop();
  const fds = [sl.sl_eventfd(), sl.sl_eventfd()];
  const tokens = fds.map((fd) =>
    loop.add(fd, EPOLLIN, () => {
      sl.sl_eventfd_drain(fd);
      throw new Error("handler failed");
    }, true),
  );
  for (const fd of fds) sl.sl_eventfd_signal(fd);
  const err = await loop.run().then(
    () => undefined,
    (e: unknown) => e,
  );
  expect((err as Error).message).toBe("handler failed");
  // Left true, every later drain of every VM would be a short one.
  expect(loop.contended).toBe(false);
  fds.forEach((fd, k) => {
    loop.remove(tokens[k]!, fd);
    sl.sl_close(fd);
  });
  loop.close();
});
