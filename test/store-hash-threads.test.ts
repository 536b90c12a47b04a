// A push's hashing on every core (chunk-hasher.ts): threads claim batches and hand them back as
// they go; whatever the threads do, every chunk is named by the SHA-256 of its exact bytes, and
// every page that holds only zeros ends up in the zero map.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { closeSync, copyFileSync, openSync, readFileSync, truncateSync, writeSync } from "node:fs";
import { join } from "node:path";
import { openImage } from "../src/sources/image/open-image.ts";
import { HashThreads, hashImage, hashThreadsFor } from "../src/sources/store/chunk-hasher.ts";
import type { HashedRange } from "../src/sources/store/chunk-hash-core.ts";
import { sha256 } from "../src/sources/store/format.ts";
import { tempDir } from "./harness.ts";
import { writeGuestLikeImage } from "./store-helpers.ts";

const MIB = 1024 * 1024;
const CHUNK = 256 * 1024;
const PAGE = 4096;
let dir: ReturnType<typeof tempDir>;
let file: string;
let bytes: Uint8Array;

beforeAll(() => {
  dir = tempDir();
  file = join(dir.path, "guest.mem");
  // Above the size at which threads are used; holes, plus zeros written as data: a whole chunk
  // and single pages inside data (hashing finds those, not the file's holes).
  writeGuestLikeImage(file, 40 * MIB, 21);
  const fd = openSync(file, "r+");
  writeSync(fd, new Uint8Array(CHUNK), 0, CHUNK, 7 * CHUNK);
  for (const p of [3 * 64 + 5, 100 * 64 + 63, 150 * 64]) writeSync(fd, new Uint8Array(PAGE), 0, PAGE, p * PAGE);
  closeSync(fd);
  bytes = new Uint8Array(readFileSync(file));
});

afterAll(() => dir?.cleanup());

const allZero = (b: Uint8Array) => b.every((x) => x === 0);

/** Hashes with the given threads; checks each chunk came once, named right, and the zero map. */
async function check(threads: HashThreads | undefined): Promise<void> {
  const image = openImage(file, { prefault: false });
  try {
    const n = bytes.length / CHUNK;
    const got: (string | null | undefined)[] = new Array(n).fill(undefined);
    await hashImage(image, file, CHUNK, (r: HashedRange) => {
      r.hashes.forEach((h, k) => {
        expect(got[r.from + k]).toBeUndefined(); // handed out once
        got[r.from + k] = h;
      });
    }, threads);
    for (let i = 0; i < n; i++) {
      const chunk = bytes.subarray(i * CHUNK, (i + 1) * CHUNK);
      expect(got[i]).toBe(allZero(chunk) ? null : sha256(chunk));
    }
    expect(got[7]).toBeNull();
    let mismatched = 0;
    for (let p = 0; p < bytes.length / PAGE; p++) if (image.zero.isZero(p) !== allZero(bytes.subarray(p * PAGE, (p + 1) * PAGE))) mismatched++;
    expect(mismatched).toBe(0);
  } finally {
    image.close();
  }
}

test("threads claiming batches: every chunk once, named by its SHA-256; zero pages found", async () => {
  await check(new HashThreads(hashThreadsFor(bytes.length)));
  await check(new HashThreads(2));
  // The other threads alone (this one only takes what they hand out).
  const only = new HashThreads(2);
  only.hashHere = false;
  await check(only);
});

test("a thread that dies holding a batch: that batch and the rest are still hashed", async () => {
  // This thread does not hash until the threads are done: the batch the failing one claimed is
  // left for it to find.
  const threads = new HashThreads(2);
  threads.hashHere = false;
  threads.workers[0]!.terminate();
  threads.workers[0] = new Worker(new URL("./fixtures/failing-hash-worker.ts", import.meta.url).href);
  await check(threads);
  // Every thread failing the same way: this thread hashes what they left.
  const bad = new HashThreads(0);
  bad.hashHere = false;
  for (let k = 0; k < 2; k++) bad.workers.push(new Worker(new URL("./fixtures/failing-hash-worker.ts", import.meta.url).href));
  await check(bad);
  // And with this thread hashing from the start too.
  const mixed = new HashThreads(1);
  mixed.workers.push(new Worker(new URL("./fixtures/failing-hash-worker.ts", import.meta.url).href));
  await check(mixed);
});

test("no thread to be had: this thread hashes it all", async () => {
  await check(new HashThreads(0));
  const none = new HashThreads(0);
  none.hashHere = false; // nobody else to hash: this thread does anyway
  await check(none);
  await check(undefined);
});

test("a file that shrinks while it is hashed: the hashing fails with a BAD_IMAGE error naming the file", async () => {
  const shrunk = join(dir.path, "shrunk.mem");
  copyFileSync(file, shrunk);
  const image = openImage(shrunk, { prefault: false });
  try {
    truncateSync(shrunk, bytes.length / 2);
    for (const threads of [new HashThreads(2), new HashThreads(0)]) {
      const err = await hashImage(image, shrunk, CHUNK, () => {}, threads).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toMatchObject({ code: "BAD_IMAGE", context: { path: shrunk } });
      expect((err as Error).message).toContain(`${shrunk}: short read at byte`);
    }
  } finally {
    image.close();
  }
});
