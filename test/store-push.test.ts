// push(): what it asks the store before it uploads (one listing page for a small store, one
// listing per first hex digit past it, HEADs past the listing budget; whichever way, a chunk is
// skipped only when the store holds its exact hash), and a push whose uploads fail.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { chunkKey, decodeManifest, manifestKey } from "../src/sources/store/format.ts";
import { pull, push } from "../src/sources/store/push.ts";
import { StoreError } from "../src/sources/store/errors.ts";
import { openStore } from "../src/sources/store/stores.ts";
import { tempDir } from "./harness.ts";

const MIB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let image: string;

beforeAll(() => {
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 8 * MIB, 5);
});

afterAll(() => dir?.cleanup());

/** `count` objects named like chunks (hashes no chunk of the image has), all starting with `lead`. */
function junk(store: string, count: number, lead: string): void {
  for (let k = 0; k < count; k++) {
    const hash = lead + Bun.hash(`${lead}-${k}`).toString(16).padStart(16, "0").repeat(4).slice(lead.length);
    const path = join(store, chunkKey(hash));
    mkdirSync(join(path, ".."), { recursive: true });
    writeFileSync(path, "x");
  }
}

async function pushTwice(store: string): Promise<void> {
  const one = await push(image, `file://${store}/one`, { chunkSize: 256 * 1024 });
  expect(one.uploadedChunks).toBeGreaterThan(0);
  // A chunk the store lost (swept, say) is uploaded again, never taken as present.
  const m = decodeManifest(readFileSync(join(store, manifestKey("one"))), "test");
  const lost = m.body.chunks.find((h) => h !== null)!;
  unlinkSync(join(store, chunkKey(lost)));
  const two = await push(image, `file://${store}/two`, { chunkSize: 256 * 1024 });
  expect(two.uploadedChunks).toBe(1);
  expect(two.existingChunks).toBe(one.uploadedChunks - 1);
  const out = join(dir.path, `${store.split("/").pop()}.mem`);
  await pull(`file://${store}/two`, out);
  expect(Bun.hash(readFileSync(out))).toBe(Bun.hash(readFileSync(image)));
}

test("a small store: one listing page", async () => {
  await pushTwice(join(dir.path, "small"));
});

test("more chunks than a page: one listing per first hex digit", async () => {
  const store = join(dir.path, "many");
  for (const d of "0123456789abcdef") junk(store, 80, d);
  await pushTwice(store);
});

test("more than the listing budget under one digit: the rest asked one by one", async () => {
  const store = join(dir.path, "deep");
  junk(store, 1100, "0");
  junk(store, 1100, "1");
  await pushTwice(store);
});

test("uploads that fail: the push fails with the store's error, no manifest, and its hashing stops", async () => {
  const big = join(dir.path, "big.mem");
  writeDemoImage(big, 64 * MIB, 6);
  const store = join(dir.path, "broken");
  // Every chunk directory is a file: every chunk PUT fails.
  mkdirSync(join(store, "chunks"), { recursive: true });
  for (let b = 0; b < 256; b++) writeFileSync(join(store, "chunks", b.toString(16).padStart(2, "0")), "");
  let calls = 0;
  const err = await push(big, `file://${store}/vm`, { progress: () => calls++ }).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toMatchObject({ code: "STORE_UNAVAILABLE" });
  expect(existsSync(join(store, manifestKey("vm")))).toBe(false);
  // This thread hashes a batch per turn of the event loop: were it still hashing, these turns
  // would hand out more.
  const after = calls;
  for (let k = 0; k < 40; k++) await new Promise<void>((r) => setImmediate(r));
  expect(calls).toBe(after);
  // Nothing holds the image open any more: a hashing thread terminated mid-batch leaked the fd
  // it had opened itself (the mapping is no fd).
  expect(openFdsOn(big)).toEqual([]);
});

/** This process's fds open on `path`. */
function openFdsOn(path: string): string[] {
  return readdirSync("/proc/self/fd").filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === path;
    } catch {
      return false; // closed meanwhile (readdir's own fd)
    }
  });
}

test("uploads still in flight when another fails: once they finish, nothing more is counted or reported", async () => {
  const store = join(dir.path, "in-flight");
  const proto = Object.getPrototypeOf(openStore(`file://${store}`)) as { put: (key: string, data: Uint8Array) => Promise<void> };
  const realPut = proto.put;
  let release!: () => void;
  const held = new Promise<void>((r) => {
    release = r;
  });
  let puts = 0;
  // The third chunk PUT fails; the others are held until the push has failed, then go through.
  proto.put = async function (this: unknown, key: string, data: Uint8Array) {
    if (key.startsWith("chunks/")) {
      if (++puts === 3) throw new StoreError("STORE_UNAVAILABLE", "injected PUT failure", { key });
      await held;
    }
    return realPut.call(this, key, data);
  };
  try {
    let calls = 0;
    const err = await push(image, `file://${store}/vm`, { chunkSize: 256 * 1024, progress: () => calls++ }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: "STORE_UNAVAILABLE", message: "injected PUT failure" });
    expect(puts).toBeGreaterThan(3); // some were in flight
    const after = calls;
    release();
    for (let k = 0; k < 40; k++) await new Promise<void>((r) => setImmediate(r));
    expect(calls).toBe(after);
    expect(existsSync(join(store, manifestKey("vm")))).toBe(false);
  } finally {
    proto.put = realPut;
  }
});
