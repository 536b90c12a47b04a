// The chunk fetcher's cache upkeep: a fetched chunk is used from its verified bytes at once, and
// written to the host cache only once the daemon is quiet (no GET in flight, no chunk asked for
// 100 ms): a restore shares the thread that writes.
import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { EventLoop } from "../src/core/event-loop.ts";
import { Logger } from "../src/core/log.ts";
import { ChunkCache } from "../src/sources/store/chunk-cache.ts";
import { ChunkFetcher } from "../src/sources/store/chunk-fetcher.ts";
import { chunkLength, decodeManifest, manifestKey, sha256 } from "../src/sources/store/format.ts";
import { push } from "../src/sources/store/push.ts";
import { parseStoreRef } from "../src/sources/store/stores.ts";
import { hostFetcher, openStoreSource } from "../src/sources/store/store-source.ts";
import { encodeWorkingSet } from "../src/scheduler/working-set.ts";
import { tempDir } from "./harness.ts";
import { writeGuestLikeImage } from "./store-helpers.ts";

const CHUNK = 256 * 1024;

describe("chunk fetcher", () => {
  test("a fetched chunk is written to the host cache only after 100 ms without a chunk asked for; the file holds its verified bytes", async () => {
    const dir = tempDir();
    const loop = new EventLoop();
    try {
      const image = join(dir.path, "vm.mem");
      writeGuestLikeImage(image, 4 * 1024 * 1024, 7);
      await push(image, `file://${dir.path}/store/vm`, { chunkSize: CHUNK });
      const m = decodeManifest(readFileSync(join(dir.path, "store", manifestKey("vm"))), "test");
      const c = m.body.chunks.findIndex((h) => h !== null);
      const hash = m.body.chunks[c]!;
      const length = chunkLength(m.body.image.size, CHUNK, c);
      const { store } = parseStoreRef(`file://${dir.path}/store/vm`);
      const logger = new Logger("warn", { sink: () => {} });
      const cacheDir = join(dir.path, "cache");
      const fetcher = new ChunkFetcher(new ChunkCache(cacheDir, 1024 * 1024 * 1024, logger), { parallel: 4, deadlineMs: 5000, logger });
      fetcher.attach(loop);
      const file = join(cacheDir, "chunks", hash.slice(0, 2), hash);

      let arrivedAt = 0;
      let lastAskAt = 0;
      let writtenAt = 0;
      let writtenWhileAsking = false;
      let bad = 0;
      const ask = () => {
        lastAskAt = performance.now();
        fetcher.acquire(store, hash, length, `chunk ${c}`, true, (err, chunk) => {
          if (err !== undefined || chunk?.length !== length) bad++;
          if (arrivedAt === 0) arrivedAt = performance.now();
        });
      };
      ask();
      // Each loop turn, as a guest faulting in that chunk would: asks again for 300 ms after it
      // arrived, then stops; the file must appear only once asking has stopped for 100 ms.
      loop.addBackground(() => {
        const written = existsSync(file);
        if (arrivedAt > 0 && performance.now() - arrivedAt < 300) {
          if (written) writtenWhileAsking = true;
          ask();
          return true;
        }
        if (!written) return true;
        writtenAt = performance.now();
        loop.stop();
        return false;
      });
      const guard = loop.after(10_000, () => loop.stop());
      await loop.run();
      guard();
      expect(arrivedAt).toBeGreaterThan(0);
      expect(bad).toBe(0);
      expect(writtenWhileAsking).toBe(false);
      expect(writtenAt).toBeGreaterThan(0);
      expect(writtenAt - lastAskAt).toBeGreaterThanOrEqual(100);
      expect(sha256(new Uint8Array(readFileSync(file)))).toBe(hash);
    } finally {
      loop.close();
      dir.cleanup();
    }
  }, 30_000);

  test("a store source fetches the manifest's working set from when it is opened, before the daemon's loop exists (verified chunks at hand); settled GETs are not owed to the loop attached later", async () => {
    const dir = tempDir();
    const loop = new EventLoop();
    try {
      const size = 4 * 1024 * 1024;
      const image = join(dir.path, "vm.mem");
      writeGuestLikeImage(image, size, 9);
      const ws = join(dir.path, "ws.bin");
      await Bun.write(ws, encodeWorkingSet(Uint32Array.from({ length: 256 }, (_, i) => i * 4), size));
      await push(image, `file://${dir.path}/store/vm`, { chunkSize: CHUNK, workingSet: ws });
      const m = decodeManifest(readFileSync(join(dir.path, "store", manifestKey("vm"))), "test");
      const wanted = [...new Set(m.body.chunks.filter((h): h is string => h !== null))];
      expect(wanted.length).toBeGreaterThan(1);
      let fetched!: () => void;
      const done = new Promise<void>((resolve) => (fetched = resolve));
      const logger = new Logger("debug", { format: "json", sink: (l) => l.includes('"store.working_set_fetched"') && fetched() });
      const opened = await openStoreSource(`file://${dir.path}/store/vm`, { cacheDir: join(dir.path, "cache"), deadlineMs: 5000, logger });
      try {
        // Opened only: no loop attached, nothing asked for by a VM.
        await done;
        if (opened.source.kind !== "remote") throw new Error("not a remote source");
        // The daemon's fetcher for that cache directory (the source's own).
        const fetcher = hostFetcher({ cacheDir: join(dir.path, "cache"), deadlineMs: 5000, logger });
        for (const h of wanted) expect(fetcher.cache.peek(h)).toBeDefined();
        opened.attach!(loop);
        // The GETs that settled before the loop existed are not owed to it.
        expect(loop.asyncPending).toBe(0);
      } finally {
        opened.close();
      }
    } finally {
      loop.close();
      dir.cleanup();
    }
  }, 30_000);
});
