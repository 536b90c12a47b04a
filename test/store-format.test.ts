// The store format and the file:// store end to end through the CLI: push/pull byte-identical,
// dedup on a second push, manifest and chunk checks.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, readdirSync, readFileSync, statSync, watch, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeDemoImage } from "../src/cli/demo-image.ts";
import { chunkKey, decodeChunk, decodeManifest, encodeChunk, encodeManifest, manifestKey, sha256 } from "../src/sources/store/format.ts";
import { ensureBuilt, patchFile, runSnapload, tempDir } from "./harness.ts";
import { writeGuestLikeImage } from "./store-helpers.ts";

const MIB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let image: string;
let store: string;

beforeAll(() => {
  ensureBuilt();
  dir = tempDir();
  image = join(dir.path, "vm.mem");
  writeDemoImage(image, 16 * MIB, 11);
  store = join(dir.path, "store");
});

afterAll(() => dir?.cleanup());

describe("chunk objects", () => {
  test("compressible chunks are zstd, incompressible ones raw; both decode to the same bytes", () => {
    const text = new TextEncoder().encode("abcdefgh".repeat(8192));
    const random = crypto.getRandomValues(new Uint8Array(65536));
    for (const [bytes, codec] of [[text, 1], [random, 0]] as const) {
      const { object, codec: got } = encodeChunk(bytes, 3);
      expect(got).toBe(codec);
      expect(decodeChunk(object, sha256(bytes), bytes.length, "test")).toEqual(bytes);
    }
  });

  test("a chunk whose content does not match its name is refused", () => {
    const bytes = new TextEncoder().encode("x".repeat(4096));
    const { object } = encodeChunk(bytes, 3);
    const other = sha256(new Uint8Array(4096));
    expect(() => decodeChunk(object, other, bytes.length, "test")).toThrow(/corrupt, not installed/);
    expect(() => decodeChunk(object, sha256(bytes), 8192, "test")).toThrow(/manifest expects 8192/);
    expect(() => decodeChunk(object.subarray(0, 5), sha256(bytes), 4096, "test")).toThrow(/shorter than a chunk header/);
  });
});

describe("file:// store through the CLI", () => {
  test("push, pull: byte-identical; a second push uploads nothing", async () => {
    const p1 = await runSnapload(["push", image, `file://${store}/one`]);
    expect(p1.code, p1.stderr).toBe(0);
    expect(p1.stdout).toMatch(/uploaded 64 of 64 data chunks/);
    const p2 = await runSnapload(["push", image, `file://${store}/two`]);
    expect(p2.code, p2.stderr).toBe(0);
    expect(p2.stdout).toMatch(/64 already in the store\); uploaded 0 of 64 data chunks, 0 B/);
    const out = join(dir.path, "pulled.mem");
    const pl = await runSnapload(["pull", `file://${store}/two`, out]);
    expect(pl.code, pl.stderr).toBe(0);
    expect(Bun.hash(readFileSync(out))).toBe(Bun.hash(readFileSync(image)));
    const ins = await runSnapload(["inspect", `file://${store}/two`, "--json"]);
    expect(ins.code, ins.stderr).toBe(0);
    const rep = JSON.parse(ins.stdout);
    expect(rep.size).toBe(16 * MIB);
    expect(rep.distinctChunks).toBe(64);
    expect(rep.storedBytes).toBeLessThan(16 * MIB);
  });

  test("a near-identical image uploads only the changed chunks; zero chunks are never stored", async () => {
    const img = join(dir.path, "guest.mem");
    writeGuestLikeImage(img, 16 * MIB, 3);
    const p1 = await runSnapload(["push", img, `file://${store}/g1`, "--chunk-size", "256k"]);
    expect(p1.code, p1.stderr).toBe(0);
    const zeroChunks = Number(p1.stdout.match(/\((\d+) all-zero/)![1]);
    expect(zeroChunks).toBeGreaterThan(0);
    // Change two pages in two different chunks.
    patchFile(img, 5 * 256 * 1024 + 100, [1, 2, 3]);
    patchFile(img, 9 * 256 * 1024 + 4096 * 7, [9]);
    const p2 = await runSnapload(["push", img, `file://${store}/g2`, "--chunk-size", "256k"]);
    expect(p2.code, p2.stderr).toBe(0);
    expect(p2.stdout).toMatch(/uploaded 2 of \d+ data chunks/);
    const out = join(dir.path, "g2.mem");
    expect((await runSnapload(["pull", `file://${store}/g2`, out])).code).toBe(0);
    expect(Bun.hash(readFileSync(out))).toBe(Bun.hash(readFileSync(img)));
  });

  test("bad input: missing snapshot, bad name, tampered manifest, tampered chunk", async () => {
    const missing = await runSnapload(["inspect", `file://${store}/nope`]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/no snapshot named "nope"/);
    const badName = await runSnapload(["push", image, `file://${store}/a b`]);
    expect(badName.code).toBe(2);
    expect(badName.stderr).toMatch(/expected STORE\/NAME/);
    // A manifest edited after it was written no longer matches its own hash.
    const mpath = join(store, manifestKey("one"));
    const text = readFileSync(mpath, "utf8");
    writeFileSync(join(store, manifestKey("edited")), text.replace('"name":"one"', '"name":"two"'));
    const edited = await runSnapload(["inspect", `file://${store}/edited`]);
    expect(edited.code).toBe(2);
    expect(edited.stderr).toMatch(/body hashes to .* corrupt or truncated/);
    // One flipped byte inside a stored chunk: pull refuses it, and leaves no file behind.
    const m = decodeManifest(readFileSync(mpath), "test");
    const victim = join(store, chunkKey(m.body.chunks[3]!));
    const size = statSync(victim).size;
    const bytes = readFileSync(victim);
    patchFile(victim, size - 10, [bytes[size - 10]! ^ 0xff]);
    const out = join(dir.path, "never.mem");
    const pl = await runSnapload(["pull", `file://${store}/one`, out]);
    expect(pl.code).toBe(2);
    expect(pl.stderr).toMatch(/chunk [0-9a-f]{16}… from .*: (content hashes to|zstd data does not decompress)/);
    expect(readdirSync(dir.path)).not.toContain("never.mem");
    patchFile(victim, size - 10, [bytes[size - 10]!]);
  });

  test("manifest of a future format version is refused with the version", () => {
    const body = decodeManifest(readFileSync(join(store, manifestKey("one"))), "t").body;
    const enc = new TextDecoder().decode(encodeManifest(body)).replace("snapload-manifest 1 ", "snapload-manifest 3 ");
    expect(() => decodeManifest(new TextEncoder().encode(enc), "t")).toThrow(/format version 3 is not supported/);
  });
});

describe("an interrupted push", () => {
  test("killed mid-upload: no snapshot is visible; re-run, it reuses what was uploaded and completes", async () => {
    const big = join(dir.path, "big.mem");
    writeDemoImage(big, 64 * MIB, 12);
    const st = join(dir.path, "istore");
    mkdirSync(join(st, "chunks"), { recursive: true });
    // Killed once a few chunk objects exist (watched, not timed).
    const proc = Bun.spawn([process.execPath, join(import.meta.dir, "../src/main.ts"), "push", big, `file://${st}/vm`, "--parallel", "1"], { stdout: "pipe", stderr: "pipe" });
    let seen = 0;
    await new Promise<void>((resolve) => {
      const w = watch(join(st, "chunks"), { recursive: true }, (_ev, name) => {
        if (name && /[0-9a-f]{64}$/.test(String(name)) && ++seen >= 5) {
          w.close();
          resolve();
        }
      });
      proc.exited.then(() => {
        w.close();
        resolve();
      });
    });
    proc.kill("SIGKILL");
    await proc.exited;
    expect(proc.signalCode).toBe("SIGKILL");
    const ins = await runSnapload(["inspect", `file://${st}/vm`]);
    expect(ins.code).toBe(2);
    expect(ins.stderr).toMatch(/no snapshot named "vm"/);
    const again = await runSnapload(["push", big, `file://${st}/vm`]);
    expect(again.code, again.stderr).toBe(0);
    const existing = Number(again.stdout.match(/(\d+) already in the store/)![1]);
    expect(existing).toBeGreaterThanOrEqual(4);
    const out = join(dir.path, "big.pulled");
    expect((await runSnapload(["pull", `file://${st}/vm`, out])).code).toBe(0);
    expect(Bun.hash(readFileSync(out))).toBe(Bun.hash(readFileSync(big)));
  }, 60_000);
});
