// The frame reader's per-call byte budget over a real loopback TCP connection: a background
// connection's turn of the daemon's loop takes at most its budget (even inside one large
// payload), so a fault or an urgent reply that becomes ready meanwhile is not kept waiting for a
// whole chunk; the payload still arrives whole, once, where its owner asked.
import { afterAll, beforeAll, beforeEach, expect, test } from "bun:test";
import { cstr, EPOLL_CTL_ADD, EPOLLIN, NativeBuffer, SL_EVENT_SIZE, sl } from "../src/ffi.ts";
import { FrameType, frame, HEADER_SIZE, MAX_CHUNK } from "../src/postcopy/protocol.ts";
import { FrameReader, FrameWriter, READ_AGAIN, READ_MORE, SENT_ALL } from "../src/postcopy/wire.ts";
import { ensureBuilt } from "./harness.ts";

let lfd = -1;
const open: number[] = [];
/** A fresh loopback TCP connection per test: [client end, server end]. */
let client = -1;
let server = -1;

beforeAll(() => {
  ensureBuilt();
  lfd = sl.sl_tcp_listen(cstr("127.0.0.1"), 0, 4);
  expect(lfd).toBeGreaterThanOrEqual(0);
  open.push(lfd);
});

beforeEach(() => {
  client = sl.sl_tcp_connect(cstr("127.0.0.1"), sl.sl_local_port(lfd));
  expect(client).toBeGreaterThanOrEqual(0);
  waitReadable(lfd);
  server = sl.sl_accept(lfd);
  expect(server).toBeGreaterThanOrEqual(0);
  open.push(client, server);
});

afterAll(() => {
  for (const fd of open) sl.sl_close(fd);
});

/** Blocks (in epoll_wait, up to 5 s) until fd is readable. */
function waitReadable(fd: number): void {
  const ep = sl.sl_epoll_create();
  const events = new NativeBuffer(SL_EVENT_SIZE);
  try {
    expect(sl.sl_epoll_ctl(ep, EPOLL_CTL_ADD, fd, EPOLLIN, 0)).toBe(0);
    expect(sl.sl_epoll_wait(ep, events.address, 1, 5000)).toBe(1);
  } finally {
    events.free();
    sl.sl_close(ep);
  }
}

test("each read takes at most its budget, even mid-payload; the frame arrives whole, once", () => {
  const payload = new Uint8Array(MAX_CHUNK);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 131 + 7) & 0xff;
  const dest = new NativeBuffer(MAX_CHUNK);
  const frames: { id: number; length: number }[] = [];
  const reader = new FrameReader({
    target: () => dest.address,
    frame: (h) => frames.push({ id: h.id, length: h.length }),
  });
  const writer = new FrameWriter();
  writer.push(frame(FrameType.DATA, payload, 42, 0));
  const budget = 16 * 1024;
  let more = 0;
  try {
    // Writer and reader take turns on the one thread until the frame is through.
    for (let turn = 0; frames.length === 0; turn++) {
      if (!writer.empty) expect(writer.flush(server)).toBeOneOf([SENT_ALL, 1]);
      const before = reader.received;
      const r = reader.read(client, budget);
      expect(reader.received - before).toBeLessThanOrEqual(budget);
      expect(r).toBeOneOf([READ_AGAIN, READ_MORE]);
      if (r === READ_MORE) more++;
      if (r === READ_AGAIN && frames.length === 0) waitReadable(client);
      expect(turn).toBeLessThan(100_000);
    }
    expect(frames).toEqual([{ id: 42, length: MAX_CHUNK }]);
    expect(Buffer.compare(Buffer.from(dest.bytes.subarray(0, MAX_CHUNK)), Buffer.from(payload))).toBe(0);
    // 128 KiB in 16 KiB turns: the budget did cut the payload up.
    expect(more).toBeGreaterThanOrEqual(MAX_CHUNK / budget - 1);
  } finally {
    reader.stop();
    dest.free();
  }
});

test("with yieldTo, a read stops after the first piece once more urgent work waits, and never makes no progress", () => {
  // Read with a yield check that always says "urgent work waits".
  const payload = new Uint8Array(MAX_CHUNK).fill(0x5a);
  const dest = new NativeBuffer(MAX_CHUNK);
  const frames: number[] = [];
  const reader = new FrameReader({ target: () => dest.address, frame: (h) => frames.push(h.id) });
  const writer = new FrameWriter();
  writer.push(frame(FrameType.DATA, payload, 7, 0));
  const piece = 8 * 1024;
  let checks = 0;
  const urgent = () => {
    checks++;
    return true;
  };
  try {
    for (let turn = 0; frames.length === 0; turn++) {
      if (!writer.empty) writer.flush(server);
      const before = reader.received;
      const r = reader.read(client, 256 * 1024, urgent, piece);
      const took = reader.received - before;
      // At most one piece per call while urgent work waits (a header and one piece of its payload)...
      expect(took).toBeLessThanOrEqual(HEADER_SIZE + piece);
      // ...and at least something whenever the socket had bytes: the stream is never starved.
      if (r === READ_MORE) expect(took).toBeGreaterThan(0);
      if (r === READ_AGAIN && frames.length === 0) waitReadable(client);
      expect(turn).toBeLessThan(100_000);
    }
    expect(frames).toEqual([7]);
    expect(checks).toBeGreaterThan(0);
    expect(dest.bytes.subarray(0, MAX_CHUNK).every((b) => b === 0x5a)).toBe(true);
  } finally {
    reader.stop();
    dest.free();
  }
});

test("sl_readable2 reports which sockets have bytes waiting, skipping negative fds", () => {
  expect(sl.sl_readable2(client, -1)).toBe(0);
  const w = new FrameWriter();
  w.push(frame(FrameType.PING, null, 1));
  expect(w.flush(server)).toBe(SENT_ALL);
  waitReadable(client);
  expect(sl.sl_readable2(client, -1)).toBe(1);
  expect(sl.sl_readable2(-1, client)).toBe(1);
  expect(sl.sl_readable2(-1, -1)).toBe(0);
});
