// EventLoop `first` fds: served before the other fds ready in the same turn (a fault or an urgent
// reply must not wait behind a bulk stream that epoll happens to list ahead of it).
import { expect, test } from "bun:test";
import { EventLoop } from "../src/core/event-loop.ts";
import { EPOLLIN, sl } from "../src/core/ffi.ts";

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
