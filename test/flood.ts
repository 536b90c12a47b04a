// Test helper (postcopy-security.test.ts): N idle TCP connections to 127.0.0.1:PORT that never
// say a word and reconnect as soon as they are dropped, as in issue 8's attack 5, from ADDRS
// source addresses (127.0.0.2, 127.0.0.3, ...: all loopback, as from several hosts; 0: from
// 127.0.0.1 itself, the address the tests' legitimate clients use).
//   bun test/flood.ts PORT N ADDRS    prints "started N" once N connects were issued
import { createConnection } from "node:net";

const port = Number(process.argv[2]);
const n = Number(process.argv[3]);
const addrs = Number(process.argv[4] ?? 1);
let reconnects = 0;

function open(i: number): void {
  const s = createConnection({ host: "127.0.0.1", port, localAddress: addrs === 0 ? "127.0.0.1" : `127.0.0.${2 + (i % addrs)}` });
  s.on("error", () => {});
  s.on("close", () => {
    reconnects++;
    setImmediate(() => open(i));
  });
}

for (let i = 0; i < n; i++) open(i);
process.stdout.write(`started ${n}\n`);
setInterval(() => process.stdout.write(`reconnects ${reconnects}\n`), 1000);
