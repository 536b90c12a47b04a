// Raw loopback TCP transfer, the ceiling for postcopy background completion.
//   bun bench/tcp-raw.ts recv --bytes N          prints "port P", then after N bytes {"bytes":N,"ns":T}
//   bun bench/tcp-raw.ts send --port P --file F  sends F's bytes (read into memory first, untimed)
// T runs from the receiver accepting the connection to its N-th byte.
import { readFileSync } from "node:fs";

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

if (mode === "recv") {
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
  const data = readFileSync(arg("file"));
  const CHUNK = 1 << 20;
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
