// Chooses the store's chunk size and zstd level: for 256 KiB / 1 MiB / 2 MiB / 4 MiB chunks and
// levels 1/3/9, on a guest-like image and a second snapshot of it with scattered changes:
// compression ratio, compress and decompress+verify throughput (one core), bytes a second push
// uploads, bytes a cold restore fetches for a 10% working set (scattered and clustered), and —
// with a real Ceph RGW (--rgw) — the time to fetch, decompress and verify one chunk (a cold fault).
//   bun bench/store-chunks.ts [--size-mib N] [--rgw]
// Writes bench/store-results.md.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { prng } from "../src/core/prng.ts";
import { CHUNK_SIZES, decodeChunk, encodeChunk, isAllZero, sha256 } from "../src/sources/store/format.ts";
import { tempDir } from "../test/harness.ts";
import { createBucket, startRgw } from "../test/ceph-rgw.ts";
import { writeGuestLikeImage } from "../test/store-helpers.ts";

const { values } = parseArgs({ options: { "size-mib": { type: "string", default: "128" }, rgw: { type: "boolean", default: false } } });
const MIB = 1024 * 1024;
const PAGE = 4096;
const size = Number(values["size-mib"]) * MIB;
const LEVELS = [1, 3, 9];
const dir = tempDir("snapload-bench-store-");
const path = join(dir.path, "a.mem");
writeGuestLikeImage(path, size, 1);
const a = new Uint8Array(readFileSync(path));
// Snapshot 2: the same guest a few seconds later — 0.5% of pages rewritten, in runs of 32 pages
// (a guest's dirty pages cluster), and (b2) scattered uniformly, the worst case for chunking.
const rnd = prng(7);
const pages = size / PAGE;
function rewrite(run: number): Uint8Array {
  const out = a.slice();
  for (let i = 0; i < pages / 200 / run; i++) {
    const first = Math.floor(rnd() * (pages - run));
    for (let p = first; p < first + run; p++) for (let k = 0; k < 64; k++) out[p * PAGE + Math.floor(rnd() * PAGE)] = (rnd() * 256) | 0;
  }
  return out;
}
const b = rewrite(32);
const b2 = rewrite(1);
const isZeroPage = (p: number) => a.subarray(p * PAGE, (p + 1) * PAGE).every((x) => x === 0);
// A 10% working set: scattered single pages, and runs of 32 pages.
const scattered = new Set<number>();
while (scattered.size < pages / 10) scattered.add(Math.floor(rnd() * pages));
const clustered = new Set<number>();
while (clustered.size < pages / 10) {
  const s = Math.floor(rnd() * (pages - 32));
  for (let k = 0; k < 32; k++) clustered.add(s + k);
}
const zeroChunk = (bytes: Uint8Array) => isAllZero(bytes);

interface Row {
  chunk: number;
  level: number;
  ratio: number;
  compressMBs: number;
  decompressGBs: number;
  secondPushBytes: number;
  secondScattered: number;
  storedBytes: number;
  coldScattered: number;
  coldClustered: number;
  rgwFaultMs?: number;
}
const rows: Row[] = [];
for (const chunk of CHUNK_SIZES) {
  for (const level of LEVELS) {
    const stored = new Map<string, number>();
    const objects: { o: Uint8Array; h: string; n: number }[] = [];
    let logical = 0;
    const perChunk: number[] = [];
    let tc = 0;
    for (let off = 0; off < size; off += chunk) {
      const bytes = a.subarray(off, off + chunk);
      if (zeroChunk(bytes)) {
        perChunk.push(0);
        continue;
      }
      const h = sha256(bytes);
      if (!stored.has(h)) {
        const t0 = performance.now();
        const { object } = encodeChunk(bytes, level);
        tc += (performance.now() - t0) / 1000;
        logical += bytes.length;
        stored.set(h, object.length);
        objects.push({ o: object, h, n: bytes.length });
      }
      perChunk.push(stored.get(h)!);
    }
    const t1 = performance.now();
    let out = 0;
    for (const { o, h, n } of objects) out += decodeChunk(o, h, n, "bench").length;
    const td = (performance.now() - t1) / 1000;
    let storedBytes = 0;
    for (const v of stored.values()) storedBytes += v;
    // Second push: chunks of the next snapshot not already stored.
    const secondPush = (next: Uint8Array) => {
      const seen = new Set(stored.keys());
      let n = 0;
      for (let off = 0; off < size; off += chunk) {
        const bytes = next.subarray(off, off + chunk);
        if (zeroChunk(bytes)) continue;
        const h = sha256(bytes);
        if (!seen.has(h)) {
          seen.add(h);
          n += encodeChunk(bytes, level).object.length;
        }
      }
      return n;
    };
    const second = secondPush(b);
    const secondScattered = secondPush(b2);
    const cold = (set: Set<number>) => {
      const touched = new Set<number>();
      for (const p of set) if (!isZeroPage(p)) touched.add(Math.floor((p * PAGE) / chunk));
      let fetched = 0;
      for (const c of touched) fetched += perChunk[c]!;
      return fetched;
    };
    rows.push({
      chunk,
      level,
      ratio: logical / storedBytes,
      compressMBs: logical / MIB / tc,
      decompressGBs: out / 1e9 / td,
      secondPushBytes: second,
      secondScattered,
      storedBytes,
      coldScattered: cold(scattered),
      coldClustered: cold(clustered),
    });
    process.stderr.write(`chunk ${chunk / 1024} KiB level ${level}: ratio ${(logical / storedBytes).toFixed(2)}\n`);
  }
}

if (values.rgw) {
  const rgw = await startRgw();
  try {
    createBucket(rgw, "bench");
    const client = new Bun.S3Client({ endpoint: rgw.endpoint, accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey, bucket: "bench", region: "us-east-1" });
    for (const row of rows.filter((r) => r.level === 3)) {
      // A data chunk from the middle of the image, as pushed.
      let off = Math.floor(size / 2 / row.chunk) * row.chunk;
      while (zeroChunk(a.subarray(off, off + row.chunk))) off += row.chunk;
      const bytes = a.subarray(off, off + row.chunk);
      const h = sha256(bytes);
      await client.write(`c/${h}`, encodeChunk(bytes, 3).object);
      const times: number[] = [];
      for (let i = 0; i < 100; i++) {
        const t = performance.now();
        const o = new Uint8Array(await client.file(`c/${h}`).arrayBuffer());
        decodeChunk(o, h, bytes.length, "rgw");
        times.push(performance.now() - t);
      }
      times.sort((x, y) => x - y);
      row.rgwFaultMs = times[Math.floor(times.length / 2)]!;
    }
  } finally {
    await rgw.stop();
  }
}
dir.cleanup();

const mib = (n: number) => `${(n / MIB).toFixed(1)} MiB`;
const lines = [
  `Store chunk-size/level sweep · ${new Date().toISOString()} · guest-like image of ${mib(size)} (45% zero 256 KiB runs, text, sparse and random data), stored ${mib(rows[0]!.storedBytes)}-ish · second snapshot: 0.5% of pages rewritten, in runs of 32 pages / scattered · cold restore: a 10% working set (${mib(scattered.size * PAGE)} touched), bytes fetched · compression: distinct data chunks, uncompressed / stored · one core`,
  "",
  "| chunk | zstd level | compression | compress | decompress + SHA-256 | stored | 2nd push uploads (runs / scattered) | cold fetch, scattered 10% | cold fetch, clustered 10% | RGW GET + decode, one chunk (p50) |",
  "|---|---|---|---|---|---|---|---|---|---|",
  ...rows.map((r) =>
    `| ${r.chunk / 1024} KiB | ${r.level} | ${r.ratio.toFixed(2)}x | ${r.compressMBs.toFixed(0)} MB/s | ${r.decompressGBs.toFixed(2)} GB/s | ${mib(r.storedBytes)} | ${mib(r.secondPushBytes)} / ${mib(r.secondScattered)} | ${mib(r.coldScattered)} | ${mib(r.coldClustered)} | ${r.rgwFaultMs !== undefined ? `${r.rgwFaultMs.toFixed(2)} ms` : "-"} |`,
  ),
];
writeFileSync(join(import.meta.dir, "store-results.md"), `${lines.join("\n")}\n`);
process.stdout.write(`${lines.join("\n")}\n`);
