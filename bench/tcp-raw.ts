// Raw loopback TCP transfer, the ceiling for postcopy background completion.
//   bun bench/tcp-raw.ts recv --bytes N [--aead]          prints "port P", then after N bytes {"bytes":N,"ns":T}
//   bun bench/tcp-raw.ts send --port P --file F [--aead]  sends F's bytes (read into memory first, untimed)
// T runs from the receiver accepting the connection to its N-th byte.
// --aead: the same bytes as AES-256-GCM records of one 128 KiB DATA chunk each (libcrypto, as the
// page server and client use it); the sender seals them all before it connects (untimed, a
// stricter baseline than the page server, which seals as it sends), the receiver opens each in
// place and checks its tag: what the same transfer costs the receiving side once it is sealed.
import { readFileSync } from "node:fs";
import { AeadKey, TAG_SIZE } from "../src/postcopy/aead.ts";
import { MAX_CHUNK } from "../src/postcopy/protocol.ts";

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
/** A fixed key: this measures the cipher's cost, not secrecy. */
const KEY = new Uint8Array(32).fill(7);
const RECORD = MAX_CHUNK + TAG_SIZE;
const KIND_PAYLOAD = 1;
const WRITE = 1 << 20;

/** Every record sealed up front (untimed, like reading the file): the receiver's side is what is measured. */
function sealAll(file: Uint8Array): Uint8Array {
  const key = new AeadKey(KEY, true);
  const records = Math.ceil(file.length / MAX_CHUNK);
  const out = Buffer.allocUnsafe(file.length + records * TAG_SIZE);
  for (let r = 0, at = 0; r < records; r++) {
    const n = Math.min(MAX_CHUNK, file.length - r * MAX_CHUNK);
    key.seal(KIND_PAYLOAD, r, file.subarray(r * MAX_CHUNK, r * MAX_CHUNK + n), out.subarray(at, at + n), n, out.subarray(at + n, at + n + TAG_SIZE));
    at += n + TAG_SIZE;
  }
  key.free();
  return out;
}

if (mode === "recv") {
  const want = Number(arg("bytes"));
  const key = aead ? new AeadKey(KEY, false) : undefined;
  const record = new Uint8Array(RECORD);
  let fill = 0;
  let seq = 0;
  let got = 0;
  let t0 = 0n;
  const payloadBytes = (wire: number) => (aead ? wire - Math.ceil(wire / RECORD) * TAG_SIZE : wire);
  const total = aead ? want + Math.ceil(want / MAX_CHUNK) * TAG_SIZE : want;
  const server = Bun.listen({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open() {
        t0 = process.hrtime.bigint();
      },
      data(_s, chunk) {
        if (key !== undefined) {
          // Records are reassembled from whatever the socket hands us, then opened in place.
          let at = 0;
          while (at < chunk.length) {
            const len = Math.min(MAX_CHUNK, want - seq * MAX_CHUNK) + TAG_SIZE;
            const take = Math.min(chunk.length - at, len - fill);
            record.set(chunk.subarray(at, at + take), fill);
            fill += take;
            at += take;
            if (fill === len) {
              const n = len - TAG_SIZE;
              if (!key.open(KIND_PAYLOAD, seq++, record, record, n, record.subarray(n, len))) {
                console.error(`tcp-raw: record ${seq - 1} failed authentication`);
                process.exit(1);
              }
              fill = 0;
            }
          }
        }
        got += chunk.length;
        if (got >= total) {
          const ns = Number(process.hrtime.bigint() - t0);
          process.stdout.write(`${JSON.stringify({ bytes: payloadBytes(got), ns })}\n`);
          server.stop(true);
          process.exit(0);
        }
      },
      close() {
        if (got < total) {
          console.error(`tcp-raw: sender closed after ${got} of ${total} bytes`);
          process.exit(1);
        }
      },
    },
  });
  process.stdout.write(`port ${server.port}\n`);
} else if (mode === "send") {
  const port = Number(arg("port"));
  const file = readFileSync(arg("file"));
  const data = aead ? sealAll(file) : file;
  let off = 0;
  const pump = (s: Bun.Socket<undefined>) => {
    while (off < data.length) {
      const want = Math.min(WRITE, data.length - off);
      const n = s.write(data.subarray(off, off + want));
      if (n > 0) off += n;
      if (n < want) return; // kernel buffer full: wait for drain
    }
    s.end();
  };
  await Bun.connect({ hostname: "127.0.0.1", port, socket: { open: pump, drain: pump, data() {}, close() {} } });
} else {
  console.error("usage: bun bench/tcp-raw.ts recv --bytes N [--aead] | send --port P --file F [--aead]");
  process.exit(2);
}
