// Raw loopback TCP transfer, the ceiling for postcopy background completion.
//   bun bench/tcp-raw.ts recv --bytes N          prints "port P", then after N bytes {"bytes":N,"ns":T}
//   bun bench/tcp-raw.ts send --port P --file F  sends F's bytes (read into memory first, untimed)
// T runs from the receiver accepting the connection to its N-th byte.
// With --aead on both sides: the crypto ceiling. The sender seals the file in 128 KiB records
// (MAX_CHUNK) with AES-256-GCM (OpenSSL, as src/postcopy/aead.ts) before it connects; the receiver
// decrypts every received piece in place, where the socket handed it over (GCM streams), and
// checks each record's 16-byte tag. No framing headers (the page server's 64-byte sealed headers).
import { dlopen, FFIType, type Pointer } from "bun:ffi";
import { readFileSync } from "node:fs";

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
    begin(): void {
      ivView.setUint32(4, seq++, true);
      c.EVP_CipherInit_ex(ctx, null, null, null, iv, -1);
    },
    update(b: Uint8Array, out: Uint8Array = b): void {
      if (b.length > 0) c.EVP_CipherUpdate(ctx, out, outl, b, b.length);
    },
    /** Sender: writes the tag. Receiver: checks `tag`; false when the record is not authentic. */
    finish(tag: Uint8Array): boolean {
      if (!encrypting) c.EVP_CIPHER_CTX_ctrl(ctx, 0x11, TAG, tag);
      const ok = c.EVP_CipherFinal_ex(ctx, scratch, outl) === 1;
      if (encrypting) c.EVP_CIPHER_CTX_ctrl(ctx, 0x10, TAG, tag);
      return ok;
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

if (mode === "recv") {
  const want = Number(arg("bytes"));
  const open = aead ? gcm(false) : undefined;
  // Where the receiver is within the current record: payload bytes left, then tag bytes.
  let inRecord = 0;
  const tag = new Uint8Array(TAG);
  let tagFill = TAG;
  let payloadGot = 0;
  const consume = (chunk: Uint8Array) => {
    let at = 0;
    while (at < chunk.length) {
      if (inRecord === 0 && tagFill === TAG) {
        inRecord = Math.min(RECORD, want - payloadGot);
        tagFill = 0;
        open!.begin();
      }
      if (inRecord > 0) {
        const n = Math.min(inRecord, chunk.length - at);
        open!.update(chunk.subarray(at, at + n));
        at += n;
        inRecord -= n;
        payloadGot += n;
        continue;
      }
      const n = Math.min(TAG - tagFill, chunk.length - at);
      tag.set(chunk.subarray(at, at + n), tagFill);
      tagFill += n;
      at += n;
      if (tagFill === TAG && !open!.finish(tag)) {
        console.error("tcp-raw: a record failed authentication");
        process.exit(1);
      }
    }
  };
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
        if (open !== undefined) {
          consume(chunk);
          if (payloadGot < want || tagFill < TAG) return;
          got = payloadGot;
        } else got += chunk.length;
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
      seal.begin();
      seal.update(plain.subarray(i * RECORD, i * RECORD + n), data.subarray(at, at + n));
      seal.finish(data.subarray(at + n, at + n + TAG));
      at += n + TAG;
    }
  }
  let off = 0;
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
