// What sealing postcopy pages costs, to choose the scheme (docs/postcopy-protocol.md, "Sealed frames").
//   bun bench/postcopy-crypto.ts [--mib N]
// Both ends in one thread, as on a loaded host: the server's work on a 128 KiB DATA chunk, the
// receive (a memcpy standing in for the kernel's), and the client's work until the bytes are in
// the slot UFFDIO_COPY reads. Then TLS 1.3 (node:tls) against plain TCP on loopback, same harness.
// Prints one JSON line per scheme: {scheme, mib, ms, mib_per_s}.
import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect, createServer as tlsCreateServer } from "node:tls";
import { NativeBuffer } from "../src/core/ffi.ts";
import { AeadKey, TAG_SIZE } from "../src/postcopy/aead.ts";
import { prng } from "./common.ts";

const argv = process.argv.slice(2);
const mibArg = argv.indexOf("--mib");
const MIB = 1024 * 1024;
const TOTAL = (mibArg >= 0 ? Number(argv[mibArg + 1]) : 256) * MIB;
const CHUNK = 128 * 1024;
const IMAGE = 64 * MIB; // cycled over: bigger than the caches, like a guest image

const image = new NativeBuffer(IMAGE);
const rnd = prng(7);
for (let i = 0; i < IMAGE / 4; i++) image.u32[i] = (rnd() * 0x1_0000_0000) >>> 0;
const slot = new NativeBuffer(CHUNK);
const staging = new NativeBuffer(CHUNK);
const key = new Uint8Array(randomBytes(32));
const tag = new Uint8Array(TAG_SIZE);

function report(scheme: string, ns: number, bytes = TOTAL): void {
  const ms = ns / 1e6;
  console.log(JSON.stringify({ scheme, mib: bytes / MIB, ms: Math.round(ms), mib_per_s: Math.round(bytes / MIB / (ms / 1000)) }));
}

function run(scheme: string, chunk: (at: number, seq: number) => void): void {
  for (let at = 0, seq = 0; at < 8 * MIB; at += CHUNK) chunk(at % IMAGE, seq++); // warm-up
  const t0 = Bun.nanoseconds();
  for (let at = 0, seq = 0; at < TOTAL; at += CHUNK) chunk(at % IMAGE, seq++);
  report(scheme, Bun.nanoseconds() - t0);
}

const view = (at: number) => image.bytes.subarray(at, at + CHUNK);

run("v1: CRC-32 frames (no secrecy, no integrity against a relay)", (at) => {
  const crc = Bun.hash.crc32(view(at));
  slot.bytes.set(view(at));
  if (Bun.hash.crc32(slot.bytes) !== crc) throw new Error("crc");
});

for (const cipher of ["aes-256-gcm", "chacha20-poly1305"] as const) {
  const nodeHas = (() => {
    try {
      createCipheriv(cipher as "aes-256-gcm", key, Buffer.alloc(12), { authTagLength: TAG_SIZE });
      return true;
    } catch {
      console.log(JSON.stringify({ scheme: `node:crypto ${cipher}`, unsupported: `not in Bun ${Bun.version}'s node:crypto` }));
      return false;
    }
  })();
  if (nodeHas) run(`node:crypto ${cipher} (update() returns a new buffer: one more copy into the slot)`, (at, seq) => {
    const iv = Buffer.alloc(12);
    iv.writeUInt32LE(seq, 4);
    const c = createCipheriv(cipher as "aes-256-gcm", key, iv, { authTagLength: TAG_SIZE });
    const ct = c.update(view(at));
    c.final();
    const t = c.getAuthTag();
    slot.bytes.set(ct);
    const d = createDecipheriv(cipher as "aes-256-gcm", key, iv, { authTagLength: TAG_SIZE });
    d.setAuthTag(t);
    slot.bytes.set(d.update(slot.bytes));
    d.final();
  });
  const tx = new AeadKey(key, true, cipher);
  const rx = new AeadKey(key, false, cipher);
  run(`libcrypto ${cipher} via FFI (encrypt into one send buffer, decrypt in place in the slot)`, (at, seq) => {
    tx.seal(1, seq, image.address + at, staging.address, CHUNK, tag);
    slot.bytes.set(staging.bytes);
    if (!rx.open(1, seq, slot.address, slot.address, CHUNK, tag)) throw new Error("open");
  });
  tx.free();
  rx.free();
}

// ---- TLS 1.3 vs plain TCP over loopback (both ends here) -------------------------------------
const dir = mkdtempSync(join(tmpdir(), "snapload-tlsbench-"));
execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost",
  "-keyout", join(dir, "k.pem"), "-out", join(dir, "c.pem")], { stdio: "ignore" });
const cert = readFileSync(join(dir, "c.pem"));
const pkey = readFileSync(join(dir, "k.pem"));
rmSync(dir, { recursive: true, force: true });

async function stream(scheme: string, tls: boolean): Promise<void> {
  const payload = Buffer.from(image.bytes.subarray(0, CHUNK * 8));
  let t0 = 0;
  const done = new Promise<number>((resolve, reject) => {
    const onConn = (s: import("node:net").Socket) => {
      let got = 0;
      s.on("data", (d: Buffer) => {
        got += d.length;
        if (got >= TOTAL) {
          resolve(Bun.nanoseconds() - t0);
          s.destroy();
        }
      });
      s.on("error", reject);
    };
    const server = tls
      ? tlsCreateServer({ key: pkey, cert, minVersion: "TLSv1.3", ...{ ciphersuites: "TLS_AES_256_GCM_SHA384" } }, onConn)
      : createServer(onConn);
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as { port: number }).port;
      const c = tls ? tlsConnect({ host: "127.0.0.1", port, ca: cert, servername: "localhost", minVersion: "TLSv1.3" }) : createConnection({ host: "127.0.0.1", port });
      c.on("error", reject);
      c.once(tls ? "secureConnect" : "connect", () => {
        t0 = Bun.nanoseconds();
        let sent = 0;
        const pump = () => {
          while (sent < TOTAL) {
            sent += payload.length;
            if (!c.write(payload)) return void c.once("drain", pump);
          }
        };
        pump();
      });
      done.finally(() => {
        c.destroy();
        server.close();
      });
    });
  });
  report(scheme, await done);
}

await stream("node:net plain TCP, loopback (reference)", false);
await stream("node:tls TLS 1.3 AES-256-GCM, loopback", true);
process.exit(0);
