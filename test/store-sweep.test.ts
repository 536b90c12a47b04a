// The object-store requester's background sweep (`--populate background`), on the shared
// SweepOrder, driven against a fake kernel (test/fake-kernel.ts) and a real file:// store: it
// asks for every chunk, a span that met EAGAIN (a REMOVE pending) is proposed again, and the VM
// completes. Page contents are checked end to end by store-serve.test.ts; here, what is asked.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { EventLoop } from "../src/core/event-loop.ts";
import { silentLogger } from "../src/core/log.ts";
import { VmSession, Scratch } from "../src/daemon/vm-session.ts";
import { HandlerTable } from "../src/scheduler/handler-table.ts";
import { openStoreSource } from "../src/sources/store/store-source.ts";
import { FAKE_BASE as BASE, FakeKernel, FAKE_PAGE as PS } from "./fake-kernel.ts";
import { ensureBuilt, runSnapload, tempDir } from "./harness.ts";

const CHUNK_PAGES = 64; // --chunk-size 256k
const PAGES = 4 * CHUNK_PAGES;
let dir: ReturnType<typeof tempDir>;
let store: string;

beforeAll(async () => {
  ensureBuilt();
  dir = tempDir();
  // Chunk 0 all zero (a null chunk: zero pages only, installed by the sweep itself), the rest
  // random with a few zero pages among them.
  const bytes = randomBytes(PAGES * PS);
  bytes.fill(0, 0, CHUNK_PAGES * PS);
  for (const p of [70, 71, 200]) bytes.fill(0, p * PS, (p + 1) * PS);
  const image = join(dir.path, "vm.mem");
  writeFileSync(image, bytes);
  store = join(dir.path, "store");
  const p = await runSnapload(["push", image, `file://${store}/vm`, "--chunk-size", "256k"]);
  expect(p.code, p.stderr).toBe(0);
});

afterAll(() => dir?.cleanup());

test("the sweep asks for every chunk, proposes a span that met EAGAIN again, and completes the VM", async () => {
  const opened = await openStoreSource(`file://${store}/vm`, { deadlineMs: 10_000, populate: "background", logger: silentLogger, cacheDir: join(dir.path, "cache") });
  const source = opened.source;
  if (source.kind !== "remote") throw new Error("a store is a remote source");
  const loop = new EventLoop();
  opened.attach?.(loop);
  const table = new HandlerTable([{ base: BASE, size: PAGES * PS, offset: 0, pageSize: PS }], source.backend);
  const scratch = new Scratch();
  const kernel = new FakeKernel();
  const vm = new VmSession(1, 999, table, scratch, { faultAround: 1, kernel });
  // The first install meets a pending REMOVE (EAGAIN); it is read right after (no REMOVE to apply).
  kernel.eagain = 1;
  kernel.afterInstall = () => {
    kernel.eagain = 0;
  };
  let failure: string | undefined;
  const check = () => {
    if (vm.table.complete) loop.stop();
  };
  // What the VM's owner does: fail, retry after 1 ms, stop once complete.
  const requester = source.openRequester(vm, {
    loop,
    logger: silentLogger,
    fail: (code, detail) => {
      failure = `${code}: ${detail}`;
      loop.stop();
    },
    delivered: () => {
      if (vm.retry.length) loop.after(1, () => (vm.serveRetries(), check()));
      check();
    },
  });
  vm.setRequester(requester);
  const cancel = loop.after(10_000, () => loop.stop());
  try {
    await loop.run();
  } finally {
    cancel();
    requester.close();
    opened.close();
    loop.close();
    scratch.free();
  }
  expect(failure).toBeUndefined();
  expect(vm.table.complete).toBe(true);
  expect(kernel.present.size).toBe(PAGES);
  // The first span (chunk 0, zero pages) met EAGAIN, and the same span was the next install, not a later pass's.
  const installs = kernel.calls.filter((c) => c.startsWith("zeropage") || c.startsWith("copy"));
  expect(installs.slice(0, 2)).toEqual([`zeropage 0+${CHUNK_PAGES} -> -11`, `zeropage 0+${CHUNK_PAGES} -> 0`]);
  // Every data page was copied once: the sweep asked for each once (no span twice, none left out).
  const copied = kernel.calls.filter((c) => c.startsWith("copy")).reduce((n, c) => n + Number(c.split(" ")[1]!.split("+")[1]), 0);
  expect(copied).toBe(PAGES - CHUNK_PAGES - 3);
}, 30_000);
