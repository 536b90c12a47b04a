// A hostile peer of the daemon's Unix socket (issue 8, attack 2): N connections, each sends a
// never-complete handshake of PREFIX bytes ("[1,1,1,…"), then drips one byte per millisecond;
// a dropped connection reconnects at once. Prints "ready" when every connection has sent its
// prefix, and on SIGTERM one JSON line of counts, then exits.
//
// usage: bun test/drip-attacker.ts SOCKET CONNECTIONS PREFIX_BYTES
import type { Socket } from "bun";

const [socketPath, connArg, prefixArg] = process.argv.slice(2);
if (!socketPath || !connArg || !prefixArg) {
  process.stderr.write("usage: drip-attacker.ts SOCKET CONNECTIONS PREFIX_BYTES\n");
  process.exit(2);
}
const connections = Number(connArg);
const prefix = new TextEncoder().encode("[" + "1,".repeat(Math.floor((Number(prefixArg) - 1) / 2)));
const drip = new TextEncoder().encode("1");
const comma = new TextEncoder().encode(",");

const stats = { connects: 0, dropped: 0, prefixes: 0, dripped: 0 };
const live = new Set<Socket<{ sent: number; ready: boolean }>>();
let announced = false;
let stopping = false;

function open(): void {
  if (stopping) return;
  stats.connects++;
  Bun.connect<{ sent: number; ready: boolean }>({
    unix: socketPath!,
    data: { sent: 0, ready: false },
    socket: {
      open(s) {
        live.add(s);
        s.data.sent = s.write(prefix);
      },
      drain(s) {
        if (s.data.sent < prefix.length) s.data.sent += s.write(prefix.subarray(s.data.sent));
      },
      close(s) {
        live.delete(s);
        stats.dropped++;
        open();
      },
      error() {},
    },
  }).catch(() => setTimeout(open, 1));
}

for (let i = 0; i < connections; i++) open();

let tick = 0;
const timer = setInterval(() => {
  tick++;
  for (const s of live) {
    if (s.data.sent < prefix.length) continue;
    if (!s.data.ready) {
      s.data.ready = true;
      stats.prefixes++;
    }
    if (s.write(tick % 2 ? drip : comma) === 1) stats.dripped++;
  }
  if (!announced && stats.prefixes >= connections) {
    announced = true;
    process.stdout.write("ready\n");
  }
}, 1);

process.on("SIGTERM", () => {
  stopping = true;
  clearInterval(timer);
  for (const s of live) s.end();
  process.stdout.write(`${JSON.stringify(stats)}\n`);
  process.exit(0);
});
