// Raw loopback TCP transfer, the ceiling for postcopy background completion.
//   bun bench/tcp-raw.ts recv --bytes N [--buffer|--aead]          prints "port P", then after N bytes {"bytes":N,"ns":T}
//   bun bench/tcp-raw.ts send --port P --file F [--buffer|--aead]  sends F's bytes (read into memory first, untimed)
// T runs from the receiver accepting the connection to its N-th byte.
// Plain: Bun's sockets on both ends (Bun hands the receiver a fresh buffer per read).
// --buffer (both sides): the C core's sockets, as the page server and the postcopy client use
// them; the receiver recv()s into one buffer it owns.
// --aead (both sides): the crypto ceiling, with --buffer's sockets. The sender seals the file in
// 128 KiB records (MAX_CHUNK) with AES-256-GCM (OpenSSL, as src/postcopy/aead.ts) before it
// connects; the receiver receives into its buffer and opens each whole record in place there,
// checking its 16-byte tag, as the client opens a DATA payload in its slot. No framing headers
// (the page server's 64-byte sealed headers).
import { dlopen, FFIType, type Pointer, ptr } from "bun:ffi";
import { readFileSync } from "node:fs";
import { cstr, EPOLL_CTL_ADD, EPOLLIN, EPOLLOUT, Errno, sl } from "../src/core/ffi.ts";

const RECORD = 128 * 1024;
const TAG = 16;

function gcm(encrypting: boolean) {
  const { i32, ptr: p, void: none } = FFIType;
  const c = dlopen(process.env.SNAPLOAD_LIBCRYPTO ?? "libcrypto.so.3", {
    EVP_aes_256_gcm: { args: [], returns: p },
    EVP_CIPHER_CTX_new: { args: [], returns: p },
    EVP_CipherInit_ex: { args: [p, p, p, p, p, i32], returns: i32 },
    EVP_CIPHER_CTX_ctrl: { args: [p, i32, i32, p], returns: i32 },
    EVP_CipherUpdate: { args: [p, p, p, p, i32], returns: i32 },
    EVP_CipherFinal_ex: { args: [p, p, p], returns: i32 },
    EVP_CIPHER_CTX_free: { args: [p], returns: none },
  }).symbols;
  const ctx = c.EVP_CIPHER_CTX_new() as Pointer;
  c.EVP_CipherInit_ex(ctx, c.EVP_aes_256_gcm(), null, new Uint8Array(32).fill(7), null, encrypting ? 1 : 0);
  const iv = new Uint8Array(12);
  const ivView = new DataView(iv.buffer);
  const outl = new Int32Array(1);
  const scratch = new Uint8Array(16);
  let seq = 0;
  return {
    /** Sender: seals `src` into `dst` (as long), the tag to `tag`. */
    seal(src: Uint8Array, dst: Uint8Array, tag: Uint8Array): void {
      ivView.setUint32(4, seq++, true);
      c.EVP_CipherInit_ex(ctx, null, null, null, iv, -1);
      c.EVP_CipherUpdate(ctx, dst, outl, src, src.length);
      c.EVP_CipherFinal_ex(ctx, scratch, outl);
      c.EVP_CIPHER_CTX_ctrl(ctx, 0x10, TAG, tag);
    },
    /** Receiver: opens the `len`-byte record at `at` in place, its tag right after it; false when not authentic. */
    open(at: number, len: number): boolean {
      ivView.setUint32(4, seq++, true);
      c.EVP_CipherInit_ex(ctx, null, null, null, iv, -1);
      c.EVP_CIPHER_CTX_ctrl(ctx, 0x11, TAG, (at + len) as Pointer);
      if (len > 0 && c.EVP_CipherUpdate(ctx, at as Pointer, outl, at as Pointer, len) !== 1) return false;
      return c.EVP_CipherFinal_ex(ctx, scratch, outl) === 1;
    },
  };
}

const [mode, ...rest] = process.argv.slice(2);
const arg = (name: string): string => {
  const i = rest.indexOf(`--${name}`);
  const v = i >= 0 ? rest[i + 1] : undefined;
  if (v === undefined) {
    console.error(`tcp-raw: --${name} is required`);
    process.exit(2);
  }
  return v;
};

const aead = rest.includes("--aead");

if (mode === "recv" && (aead || rest.includes("--buffer"))) {
  // Like the postcopy client: the C core's non-blocking socket, recv() straight into one buffer
  // we own (no buffer allocated per read), each whole record opened in place there. The buffer
  // holds BATCH whole records and is filled from its start again once they are all in, so a
  // record never straddles its end and nothing is copied in user space.
  const want = Number(arg("bytes"));
  const open = aead ? gcm(false) : undefined;
  const rec = aead ? RECORD + TAG : RECORD;
  const BATCH = 4; // 512 KiB, what one read of Bun's own sockets takes at most
  const buf = new Uint8Array(rec * BATCH);
  const base = ptr(buf);
  const lfd = sl.sl_tcp_listen(cstr("127.0.0.1"), 0, 1);
  if (lfd < 0) throw new Error(`tcp-raw: listen failed (${lfd})`);
  process.stdout.write(`port ${sl.sl_local_port(lfd)}\n`);
  const ep = sl.sl_epoll_create();
  const events = new BigUint64Array(2 * 4); // 4 struct sl_event
  sl.sl_epoll_ctl(ep, EPOLL_CTL_ADD, lfd, EPOLLIN, 0);
  let fd = -Errno.EAGAIN;
  while (fd === -Errno.EAGAIN) {
    sl.sl_epoll_wait(ep, events, 4, -1);
    fd = sl.sl_accept(lfd);
  }
  if (fd < 0) throw new Error(`tcp-raw: accept failed (${fd})`);
  const t0 = process.hrtime.bigint();
  sl.sl_epoll_ctl(ep, EPOLL_CTL_ADD, fd, EPOLLIN, 1);
  let payloadGot = 0; // payload bytes received and (with --aead) opened
  let fill = 0; // bytes in buf
  let opened = 0; // bytes of buf consumed as whole records
  while (payloadGot < want) {
    const n = sl.sl_recv(fd, (base + fill) as Pointer, buf.length - fill);
    if (n === -Errno.EAGAIN) {
      sl.sl_epoll_wait(ep, events, 4, -1);
      continue;
    }
    if (n <= 0) {
      console.error(`tcp-raw: sender closed after ${payloadGot} of ${want} bytes (${n})`);
      process.exit(1);
    }
    fill += n;
    for (;;) {
      const len = Math.min(RECORD, want - payloadGot);
      const size = aead ? len + TAG : len;
      if (len === 0 || fill - opened < size) break;
      if (open !== undefined && !open.open(base + opened, len)) {
        console.error("tcp-raw: a record failed authentication");
        process.exit(1);
      }
      opened += size;
      payloadGot += len;
    }
    if (opened === buf.length) fill = opened = 0;
  }
  const ns = Number(process.hrtime.bigint() - t0);
  process.stdout.write(`${JSON.stringify({ bytes: payloadGot, ns })}\n`);
  process.exit(0);
} else if (mode === "recv") {
  const want = Number(arg("bytes"));
  let got = 0;
  let t0 = 0n;
  const server = Bun.listen({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open() {
        t0 = process.hrtime.bigint();
      },
      data(_s, chunk) {
        got += chunk.length;
        if (got >= want) {
          const ns = Number(process.hrtime.bigint() - t0);
          process.stdout.write(`${JSON.stringify({ bytes: got, ns })}\n`);
          server.stop(true);
          process.exit(0);
        }
      },
      close() {
        if (got < want) {
          console.error(`tcp-raw: sender closed after ${got} of ${want} bytes`);
          process.exit(1);
        }
      },
    },
  });
  process.stdout.write(`port ${server.port}\n`);
} else if (mode === "send") {
  const port = Number(arg("port"));
  const plain = readFileSync(arg("file"));
  const CHUNK = 1 << 20;
  let data = plain;
  if (aead) {
    // Sealed before connecting (untimed, like reading the file): the sender's encryption, which
    // a page server does on its own CPU, is left out, so this ceiling is if anything too high.
    const seal = gcm(true);
    const records = Math.ceil(plain.length / RECORD);
    data = Buffer.alloc(plain.length + records * TAG);
    for (let i = 0, at = 0; i < records; i++) {
      const n = Math.min(RECORD, plain.length - i * RECORD);
      seal.seal(plain.subarray(i * RECORD, i * RECORD + n), data.subarray(at, at + n), data.subarray(at + n, at + n + TAG));
      at += n + TAG;
    }
  }
  let off = 0;
  if (aead || rest.includes("--buffer")) {
    // The C core's non-blocking socket and send() from the buffer, as the page server sends.
    const fd = sl.sl_tcp_connect(cstr("127.0.0.1"), port);
    if (fd < 0) throw new Error(`tcp-raw: connect failed (${fd})`);
    const ep = sl.sl_epoll_create();
    const events = new BigUint64Array(2 * 4);
    sl.sl_epoll_ctl(ep, EPOLL_CTL_ADD, fd, EPOLLOUT, 0);
    const base = ptr(data);
    while (off < data.length) {
      const n = sl.sl_send(fd, (base + off) as Pointer, Math.min(CHUNK, data.length - off));
      if (n === -Errno.EAGAIN) sl.sl_epoll_wait(ep, events, 4, -1);
      else if (n < 0) throw new Error(`tcp-raw: send failed (${n})`);
      else off += n;
    }
    process.exit(0);
  }
  const pump = (s: Bun.Socket<undefined>) => {
    while (off < data.length) {
      const want = Math.min(CHUNK, data.length - off);
      const n = s.write(data.subarray(off, off + want));
      if (n > 0) off += n;
      if (n < want) return; // kernel buffer full: wait for drain
    }
    s.end();
  };
  await Bun.connect({ hostname: "127.0.0.1", port, socket: { open: pump, drain: pump, data() {}, close() {} } });
} else {
  console.error("usage: bun bench/tcp-raw.ts recv --bytes N | send --port P --file F");
  process.exit(2);
}
