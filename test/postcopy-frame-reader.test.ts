// The frame reader's read budget (the background channel reads about one frame per wake-up):
// whatever the budget, and wherever it runs out (inside a header, exactly at the end of a
// header, inside a payload, exactly at the end of a frame), every frame arrives whole, opens,
// and is handed over once and in order. Real sealed frames over a real loopback TCP connection.
import { afterAll, describe, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { cstr, Errno, NativeBuffer, sl } from "../src/core/ffi.ts";
import { encodeHeader, type FrameHeader, FrameType, frame, HEADER_SIZE } from "../src/postcopy/protocol.ts";
import { ReceiveSeal, SEALED_HEADER_SIZE, SendSeal } from "../src/postcopy/seal.ts";
import { FrameReader, READ_AGAIN, READ_MORE } from "../src/postcopy/wire.ts";

/** A connected pair of non-blocking loopback TCP sockets. */
function tcpPair(): [number, number] {
  const lfd = sl.sl_tcp_listen(cstr("127.0.0.1"), 0, 4);
  expect(lfd).toBeGreaterThanOrEqual(0);
  const port = sl.sl_local_port(lfd);
  const c = sl.sl_tcp_connect(cstr("127.0.0.1"), port);
  expect(c).toBeGreaterThanOrEqual(0);
  let s = -Errno.EAGAIN;
  for (let i = 0; i < 10_000 && s === -Errno.EAGAIN; i++) s = sl.sl_accept(lfd);
  expect(s).toBeGreaterThanOrEqual(0);
  sl.sl_close(lfd);
  return [c, s];
}

const fds: number[] = [];
afterAll(() => {
  for (const fd of fds) sl.sl_close(fd);
});

const DATA_LENGTHS = [4096, 131072, 0, 8192, 65536 - SEALED_HEADER_SIZE, 12288, 131072, 4096];

describe("the frame reader with a budget", () => {
  // Budgets that end inside a header, exactly at its end, one byte past it, inside a payload,
  // exactly at the end of a header plus a whole 4 KiB payload, and far beyond.
  const budgets = [1, SEALED_HEADER_SIZE - 1, SEALED_HEADER_SIZE, SEALED_HEADER_SIZE + 1, 4096, SEALED_HEADER_SIZE + 4096, 64 * 1024, 256 * 1024];
  for (const budget of budgets) {
    test(`budget ${budget}: every frame arrives whole, opens, once, in order`, () => {
      const [c, s] = tcpPair();
      fds.push(c, s);
      const key = randomBytes(32);
      const send = new SendSeal(key);
      const target = new NativeBuffer(131072);
      const sendBuf = new NativeBuffer(131072);
      // The wire: a sealed DATA frame per length (zero-length ones too), with a PONG between.
      const wire: Uint8Array[] = [];
      const sent: Buffer[] = [];
      DATA_LENGTHS.forEach((len, i) => {
        const clear = randomBytes(len);
        sent.push(clear);
        const header = new Uint8Array(HEADER_SIZE);
        encodeHeader(new DataView(header.buffer), 0, FrameType.DATA, len, i + 1, 0, 0);
        sendBuf.bytes.set(clear);
        wire.push(send.data(header, sendBuf.address, sendBuf.address, len));
        wire.push(sendBuf.bytes.slice(0, len));
        wire.push(send.frame(frame(FrameType.PONG, null)));
      });
      const got: { id: number; type: number; bytes: Buffer }[] = [];
      const reader = new FrameReader({
        target: (h: FrameHeader) => (h.type === FrameType.DATA ? target.address : -1),
        frame: (h: FrameHeader) => {
          got.push({ id: h.id, type: h.type, bytes: Buffer.from(target.bytes.subarray(0, h.type === FrameType.DATA ? h.length : 0)) });
        },
      });
      reader.seal(new ReceiveSeal(key));
      // Send a piece, read with the budget, repeat: the budget runs out at every kind of place.
      const all = Buffer.concat(wire);
      let at = 0;
      let calls = 0;
      while (got.length < wire.length / 3 * 2) {
        if (at < all.length) {
          const n = sl.sl_send(s, all.subarray(at), Math.min(all.length - at, 50_000));
          if (n > 0) at += n;
          else expect(-n).toBe(Errno.EAGAIN);
        }
        const before = reader.received;
        const r = reader.read(c, budget);
        calls++;
        expect([READ_AGAIN, READ_MORE]).toContain(r);
        // Never more than the budget plus one receive's worth past it (a frame is never cut).
        if (r === READ_MORE) expect(reader.received - before).toBeGreaterThanOrEqual(Math.min(budget, 1));
        expect(calls).toBeLessThan(100_000);
      }
      expect(reader.idle).toBe(true);
      expect(got.length).toBe(DATA_LENGTHS.length * 2);
      DATA_LENGTHS.forEach((len, i) => {
        const data = got[2 * i]!;
        expect(data.type).toBe(FrameType.DATA);
        expect(data.id).toBe(i + 1);
        expect(data.bytes.equals(sent[i]!)).toBe(true);
        expect(got[2 * i + 1]!.type).toBe(FrameType.PONG);
        expect(len).toBe(data.bytes.length);
      });
      // Nothing left over.
      expect(reader.read(c, budget)).toBe(READ_AGAIN);
      reader.stop();
      send.free();
      target.free();
      sendBuf.free();
    });
  }
});
