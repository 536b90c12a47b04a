// Hostile peers of the page server: a client that floods requests and never reads its replies.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { readTokenFile } from "../src/postcopy/auth.ts";
import { ErrorCode, FrameType, frame, Role } from "../src/postcopy/protocol.ts";
import { ensureBuilt, tempDir } from "./harness.ts";
import { type PageServerProc, RawClient, startPageServer } from "./postcopy-wire.ts";

let dir: ReturnType<typeof tempDir>;
let ps: PageServerProc;
let token: Buffer;

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir("snapload-review-");
  const image = join(dir.path, "vm.mem");
  writeDemoImage(image, 8 * 1024 * 1024, 5);
  const tokenFile = join(dir.path, "token");
  writeFileSync(tokenFile, "correct horse battery staple\n", { mode: 0o600 });
  token = readTokenFile(tokenFile);
  ps = await startPageServer(["--mem", image, "--token-file", tokenFile, "--log-format", "json", "--log-level", "debug"]);
});
afterAll(async () => {
  await ps?.daemon.stop();
  dir?.cleanup();
});

const rssKiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);

for (const [k, kind] of (["PING", "out-of-bounds REQUEST"] as const).entries()) {
  test(`an authenticated client that floods ${kind}s and never reads does not grow the page server without bound`, async () => {
    const c = await RawClient.connect(ps.port);
    await c.authenticate(token, Role.URGENT);
    c.socket.pause(); // never read again
    const pid = ps.daemon.proc.pid;
    const before = rssKiB(pid);
    const one = kind === "PING" ? frame(FrameType.PING, null, 7) : frame(FrameType.REQUEST, null, 7, 2 ** 40, 4096);
    for (let i = 0; i < 1024 && !c.closed; i++) { // 256 MiB of sealed frames (64 bytes each)
      const batch = Buffer.concat(Array.from({ length: 4096 }, () => c.wire(one))); // 256 KiB
      if (!c.socket.write(batch)) await new Promise((r) => { c.socket.once("drain", r); setTimeout(r, 2000); });
    }
    // Dropped for not reading its replies (this test's is the (k+1)-th such refusal), once the server
    // has read what it could: then its memory is what the flood cost.
    await ps.daemon.waitForEvents("page_server.client_refused", k + 1, (e) => e.code === ErrorCode.OVERLOADED, 30_000);
    const grown = rssKiB(pid) - before;
    console.log(`${kind}: page server RSS grew by ${(grown / 1024).toFixed(0)} MiB; connection closed: ${c.closed}`);
    c.close();
    expect(grown).toBeLessThan(64 * 1024);
    // Not for anything else: every frame it sent was sealed right.
    expect(ps.daemon.events().filter((e) => e.event === "page_server.client_refused" && e.code !== ErrorCode.OVERLOADED)).toEqual([]);
    expect(ps.daemon.events().filter((e) => e.event === "page_server.client_closed" && e.cause === "tampered")).toEqual([]);
  }, 60_000);
}
