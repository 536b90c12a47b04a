// `--mem STORE/NAME` (file://, s3://, http(s)://): a snapshot in an object store, restored
// lazily. At startup the manifest is fetched and checked (size, zero map, chunk list, working
// set). Then each VM gets a StoreRequester: a data page it needs is asked of the ChunkFetcher
// (shared by every VM of the daemon) as the chunk holding it; when the verified chunk is at hand
// (mapped from the host cache) the pages go from the mapping into the guest, as from a local image.
// A chunk that cannot be had by the deadline fails the VM (killed): never a zero or a guess.
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NativeBuffer } from "../../core/ffi.ts";
import { IMAGE_PAGE } from "../image/snapshot-image.ts";
import { contextFields, formatBytes, type Logger } from "../../core/log.ts";
import { AGAIN, GONE, installErrno, installFailed, PAGE_IN_FLIGHT, PAGE_MISSING, type PageRegion as Region, type PageRequester, type RemoteBackend, type OpenedSource, type RemoteSource, type RequesterContext, type RequesterVm, type SourceOptions } from "../port.ts";
import { errnoName } from "../../core/ffi.ts";
import { SweepOrder } from "../../scheduler/sweep-order.ts";
import { ChunkCache } from "./chunk-cache.ts";
import { ChunkFetcher } from "./chunk-fetcher.ts";
import { StoreError } from "./errors.ts";
import { chunkCount, chunkLength, DEFAULT_ZSTD_LEVEL, decodeManifest, encodeManifest, type Manifest, type ManifestBody, sha256, STORE_FORMAT_VERSION, zeroMapToBase64 } from "./format.ts";
import { fetchManifest } from "./push.ts";
import { type ObjectStore, parseStoreRef } from "./stores.ts";

export const DEFAULT_CACHE_SIZE = 10 * 1024 * 1024 * 1024;
export const DEFAULT_STORE_PARALLEL = 16;
export function defaultCacheDir(): string {
  return join(process.env.XDG_CACHE_HOME ?? (process.getuid?.() === 0 ? "/var/cache" : tmpdir()), "snapload");
}

export interface StoreSourceOptions extends SourceOptions {
  cacheDir?: string;
  cacheSize?: number;
  s3Endpoint?: string;
  storeParallel?: number;
}

/** Cached chunks verified before the daemon listens (~0.3 s of hashing); the rest between faults. */
const WARM_SYNC_BYTES = 256 * 1024 * 1024;

/** One fetcher (and cache) per daemon and cache directory: every source and VM shares its GETs. */
const fetchers = new Map<string, ChunkFetcher>();

/** The daemon's fetcher for the host cache directory (made on first use). */
export function hostFetcher(opts: Pick<StoreSourceOptions, "cacheDir" | "cacheSize" | "storeParallel" | "deadlineMs" | "logger">): ChunkFetcher {
  const cacheDir = opts.cacheDir ?? defaultCacheDir();
  let fetcher = fetchers.get(cacheDir);
  if (fetcher === undefined) {
    const cache = new ChunkCache(cacheDir, opts.cacheSize ?? DEFAULT_CACHE_SIZE, opts.logger);
    fetcher = new ChunkFetcher(cache, { parallel: opts.storeParallel ?? DEFAULT_STORE_PARALLEL, deadlineMs: opts.deadlineMs, logger: opts.logger });
    fetchers.set(cacheDir, fetcher);
  }
  return fetcher;
}

export async function openStoreSource(ref: string, opts: StoreSourceOptions): Promise<OpenedSource & { prefetch?: Uint32Array }> {
  const { store, name } = parseStoreRef(ref, { s3Endpoint: opts.s3Endpoint });
  const t0 = performance.now();
  const manifest = await fetchManifest(store, name);
  const fetcher = hostFetcher(opts);
  const b = manifest.body;
  if (b.image.source === "qemu-file") {
    throw new StoreError("BAD_CONFIG", `${ref} holds a whole QEMU snapshot file (push --whole-file, for qemu-restore), not guest memory; push it without --whole-file to serve it`, { ref });
  }
  opts.logger.debug("store.manifest", `${ref}: manifest ${manifest.hash.slice(0, 16)} in ${(performance.now() - t0).toFixed(1)} ms`, { ref, hash: manifest.hash, ms: performance.now() - t0 });
  // The working set's GETs go out now, while the daemon warms up (~0.5 s before it listens):
  // measured, the first VM of a cold cache otherwise waited on nearly all of them.
  prefetchWorkingSet(store, manifest, fetcher, ref, opts.logger);
  // No local bytes: chunks arrive through the requester.
  const backend: RemoteBackend = { kind: "remote", size: b.image.size, zero: manifest.zero, description: `store ${ref}` };
  const sweep = opts.populate === "background";
  const f = fetcher;
  const source: RemoteSource = {
    kind: "remote",
    backend,
    openRequester: (vm, ctx) => {
      f.attach(ctx.loop);
      return new StoreRequester(vm, ctx, { store, manifest, fetcher: f, sweep, ref });
    },
    warmUpRequester: (vm, ctx, backend) => warmUpRequester(vm, ctx, backend, store, opts.deadlineMs),
  };
  const dataChunks = b.chunks.filter((h) => h !== null).length;
  const zeroPages = manifest.zero.countZero();
  // Chunks to map and verify ahead of need if the host cache has them: the working set's first.
  const order: number[] = [];
  const seen = new Set<number>();
  const add = (c: number) => {
    if (!seen.has(c) && b.chunks[c] !== null) {
      seen.add(c);
      order.push(c);
    }
  };
  for (const p of manifest.workingSet ?? []) add(Math.floor((p * IMAGE_PAGE) / b.chunkSize));
  for (let c = 0; c < b.chunks.length; c++) add(c);
  return {
    source,
    attach: (loop) => {
      f.attach(loop);
      const t = performance.now();
      const bytes = f.warm(order.map((c) => ({ hash: b.chunks[c]!, length: chunkLength(b.image.size, b.chunkSize, c) })), WARM_SYNC_BYTES);
      if (bytes) opts.logger.debug("store.cache_warm", `${ref}: ${formatBytes(bytes)} of chunks mapped and verified from the host cache in ${(performance.now() - t).toFixed(1)} ms`, { ref, bytes, ms: performance.now() - t });
    },
    ...(manifest.workingSet !== undefined ? { prefetch: manifest.workingSet } : {}),
    summary:
      `store ${ref} (manifest ${manifest.hash.slice(0, 16)}), ${b.image.size} bytes (${manifest.zero.pages - zeroPages} data, ${zeroPages} zero pages), ` +
      `${dataChunks} chunks of ${formatBytes(b.chunkSize)}, ${f.cache.describe()}, ${sweep ? "background completion" : "on demand"}, deadline ${opts.deadlineMs} ms` +
      (manifest.workingSet ? `, working set of ${manifest.workingSet.length} pages` : ""),
    fields: {
      format: "store", manifest: manifest.hash, chunkSize: b.chunkSize, chunks: dataChunks, dataPages: manifest.zero.pages - zeroPages, zeroPages,
      deadlineMs: opts.deadlineMs, background: sweep,
    },
    close: () => closeFetcher(f, ref, opts.logger),
  };
}

/** Chunks of the warm-up's image: several in its few pages, as a real image has (the smallest a manifest allows). */
const WARM_UP_CHUNK = 64 * 1024;

/**
 * A StoreRequester over a snapshot made up here for `backend` (its data pages hold chunk-numbered
 * bytes), its chunks verified and mapped from a cache of its own in a temporary directory, as a
 * warm restore's are: the daemon's JIT warm-up drives faults through the real requester, fetcher
 * and cache code with it. Nothing is fetched (`store` is never asked: every chunk is at hand).
 */
function warmUpRequester(vm: RequesterVm, ctx: RequesterContext, backend: RemoteBackend, store: ObjectStore, deadlineMs: number): { requester: PageRequester; release(): void } {
  const dir = mkdtempSync(join(tmpdir(), "snapload-warm-up-"));
  const cache = new ChunkCache(dir, 64 * 1024 * 1024, ctx.logger);
  const release = () => {
    cache.close();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const size = backend.size;
    const chunks: (string | null)[] = [];
    for (let c = 0; c < chunkCount(size, WARM_UP_CHUNK); c++) {
      const bytes = new Uint8Array(chunkLength(size, WARM_UP_CHUNK, c)).fill(c + 1);
      const first = (c * WARM_UP_CHUNK) / IMAGE_PAGE;
      for (let p = 0; p * IMAGE_PAGE < bytes.length; p++) if (backend.zero.isZero(first + p)) bytes.fill(0, p * IMAGE_PAGE, (p + 1) * IMAGE_PAGE);
      const data = bytes.some((x) => x !== 0);
      const hash = data ? sha256(bytes) : null;
      chunks.push(hash);
      if (hash !== null) cache.insert(hash, bytes);
    }
    while (cache.persist());
    const body: ManifestBody = {
      format: STORE_FORMAT_VERSION, name: "warm-up", created: new Date(0).toISOString(), image: { size, pageSize: IMAGE_PAGE, source: "raw" }, chunkSize: WARM_UP_CHUNK,
      compression: { codec: "zstd", level: DEFAULT_ZSTD_LEVEL }, zero: zeroMapToBase64(backend.zero), chunks, stored: chunks.map((h) => (h === null ? 0 : WARM_UP_CHUNK)),
    };
    const manifest = decodeManifest(encodeManifest(body), "warm-up");
    const fetcher = new ChunkFetcher(cache, { parallel: 1, deadlineMs, logger: ctx.logger });
    return { requester: new StoreRequester(vm, ctx, { store, manifest, fetcher, sweep: false, ref: "warm-up" }), release };
  } catch (e) {
    release();
    throw e;
  }
}

/** At shutdown: chunks fetched but not written yet go to the cache (the next daemon finds them there); one line of counters. */
export function closeFetcher(f: ChunkFetcher, ref: string, logger: Logger): void {
  while (f.cache.persist());
  const c = f.counters;
  const k = f.cache.counters;
  const lat = [...f.getMs].sort((a, b) => a - b);
  const q = (x: number) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(x * lat.length))]! : 0);
  const spanMs = f.firstGetAt && f.lastReadyAt ? f.lastReadyAt - f.firstGetAt : 0;
  logger.info(
    "store.closed",
    `store ${ref}: ${c.gets} GETs (${formatBytes(c.bytes)}), ${c.coalesced} waits joined a GET in flight, ${c.retries} retries, ${c.badFetches} corrupt, ${c.decodeMs.toFixed(1)} ms decoding; ` +
      `GET latency p50 ${q(0.5).toFixed(1)} ms, p90 ${q(0.9).toFixed(1)} ms, max ${q(1).toFixed(1)} ms, up to ${c.maxInFlight} in flight, first GET to last chunk ${spanMs.toFixed(0)} ms; ` +
      `cache: ${k.hits} hits, ${k.inserted} inserted, ${k.evicted} evicted, ${k.corrupt} corrupt`,
    {
      ref, gets: c.gets, bytes: c.bytes, coalesced: c.coalesced, retries: c.retries, badFetches: c.badFetches, decodeMs: c.decodeMs,
      getP50Ms: q(0.5), getP90Ms: q(0.9), getMaxMs: q(1), maxInFlight: c.maxInFlight, spanMs,
      cacheHits: k.hits, cacheInserted: k.inserted, cacheEvicted: k.evicted, cacheCorrupt: k.corrupt,
    },
  );
}

/**
 * From startup, before any VM asks: the manifest's working set's chunks, in first-touch order,
 * as background fetches (faults go first; a VM's prefetch joins the GETs in flight).
 */
export function prefetchWorkingSet(store: ObjectStore, m: Manifest, f: ChunkFetcher, ref: string, logger: Logger): void {
  if (m.workingSet === undefined) return;
  const b = m.body;
  const t0 = performance.now();
  const wanted: number[] = [];
  const seen = new Set<number>();
  for (const p of m.workingSet) {
    const c = Math.floor((p * IMAGE_PAGE) / b.chunkSize);
    if (seen.has(c) || b.chunks[c] === null) continue;
    seen.add(c);
    wanted.push(c);
  }
  let left = wanted.length;
  let failed = 0;
  for (const c of wanted) {
    f.acquire(store, b.chunks[c]!, chunkLength(b.image.size, b.chunkSize, c), `chunk ${c} of "${b.name}"`, false, (err) => {
      if (err !== undefined) failed++;
      if (--left > 0) return;
      const ms = performance.now() - t0;
      logger.debug("store.working_set_fetched", `${ref}: working set's ${wanted.length} chunks here in ${ms.toFixed(1)} ms${failed ? ` (${failed} could not be had)` : ""}`, { ref, chunks: wanted.length, failed, ms });
    });
  }
}

interface StoreTarget {
  store: ObjectStore;
  manifest: Manifest;
  fetcher: ChunkFetcher;
  sweep: boolean;
  ref: string;
}

/** Background chunks one VM may have asked for and not received, during the sweep. */
const SWEEP_WINDOW_CHUNKS = 8;

/** One VM's view of the store: turns page requests into chunk acquisitions and delivers pages. */
export class StoreRequester implements PageRequester {
  private readonly chunkSize: number;
  private readonly size: number;
  private readonly hashes: (string | null)[];
  private readonly name: string;
  private done = false;
  /** Set while request() runs inside the fault path: deliveries then leave retries and detach to it. */
  private inline = 0;
  private staging: NativeBuffer | undefined;
  /**
   * The background sweep's order (the one the populator and the postcopy client use). It does
   * not jump after the guest's faults as the populator's does: measured, that made background
   * completion slower here (docs/architecture.md, scheduling policies).
   */
  private readonly sweepOrder: SweepOrder;
  private readonly regionDone: (unit: number) => boolean;
  /** The order finished a pass; the next begins once the pass's chunks are all here. */
  private passOver = false;
  private sweepOutstanding = 0;
  private sweepScheduled = false;

  constructor(
    private readonly vm: RequesterVm,
    private readonly ctx: RequesterContext,
    private readonly t: StoreTarget,
  ) {
    this.chunkSize = t.manifest.body.chunkSize;
    this.size = t.manifest.body.image.size;
    this.hashes = t.manifest.body.chunks;
    this.name = t.manifest.body.name;
    const regions = vm.table.regions;
    // One chunk's worth of region pages per span (at least one page: a huge page spans chunks).
    this.sweepOrder = new SweepOrder(regions.length, (u) => regions[u]!.pages, (u) => Math.floor(this.chunkSize / regions[u]!.pageSize));
    this.regionDone = (u) => regions[u]!.settled === regions[u]!.pages;
    if (t.sweep) this.scheduleSweep();
  }

  request(region: Region, first: number, count: number, urgent: boolean, sweep = false): void {
    if (this.done) return;
    this.inline++;
    try {
      const ps = region.pageSize;
      let k = first;
      const end = first + count;
      // A failure met on the way may have closed us (the owner failed the VM): stop there.
      while (k < end && !this.done) {
        const off = region.offset + k * ps;
        const c = Math.floor(off / this.chunkSize);
        if (ps <= this.chunkSize) {
          // The pages of this run that lie in chunk c.
          const chunkEnd = (c + 1) * this.chunkSize;
          const n = Math.min(end - k, Math.ceil((chunkEnd - off) / ps));
          this.piece(region, k, n, [c], urgent, sweep);
          k += n;
        } else {
          // A huge page spans several chunks: it is installed when all of them are here.
          const chunks: number[] = [];
          for (let o = off; o < off + ps; o += this.chunkSize) chunks.push(Math.floor(o / this.chunkSize));
          this.piece(region, k, 1, chunks, urgent, sweep);
          k++;
        }
      }
    } finally {
      this.inline--;
    }
  }

  hurry(region: Region, page: number): void {
    if (this.done) return;
    const off = region.offset + page * region.pageSize;
    for (let o = off; o < off + region.pageSize; o += this.chunkSize) {
      const h = this.hashes[Math.floor(o / this.chunkSize)];
      if (h) this.t.fetcher.hurry(h);
    }
  }

  /** Region pages [k, k+n) need chunks `chunks`: deliver once every one of them is at hand. */
  private piece(region: Region, k: number, n: number, chunks: number[], urgent: boolean, sweep: boolean): void {
    let missing = chunks.length;
    let failed = false;
    if (sweep) this.sweepOutstanding++;
    const name = this.name;
    for (const c of chunks) {
      const hash = this.hashes[c];
      const length = chunkLength(this.size, this.chunkSize, c);
      const arrived = (err: StoreError | undefined) => {
        if (failed || this.done) return;
        if (err !== undefined) {
          failed = true;
          if (sweep) this.sweepOutstanding--;
          return this.ctx.fail(err.code, err.message, { ...contextFields(err.context), ref: this.t.ref, chunkIndex: c });
        }
        if (--missing === 0) {
          if (sweep) this.sweepOutstanding--;
          this.deliver(region, k, n, chunks);
        }
      };
      // A null chunk is all zero: nothing to fetch (a huge page may span one).
      if (hash === null || hash === undefined) arrived(undefined);
      else this.t.fetcher.acquire(this.t.store, hash, length, `chunk ${c} of "${name}"`, urgent, arrived);
    }
  }

  private deliver(region: Region, k: number, n: number, chunks: number[]): void {
    // Closed by the VM's owner (detached or gone): nothing more to install.
    if (this.done) return;
    const ps = region.pageSize;
    const off = region.offset + k * ps;
    let src: number;
    if (chunks.length === 1) {
      // The common case, without the arrays below (the fault path of every 4 KiB page).
      const c = chunks[0]!;
      const h = this.hashes[c];
      // Looked up now, not when it arrived: a chunk's bytes move from a buffer to the cache mapping.
      const got = h ? this.t.fetcher.cache.peek(h) : undefined;
      if (got === undefined) {
        // Evicted since it arrived (a tiny cache): ask for it again; the pages stay in flight.
        if (h) return this.piece(region, k, n, chunks, true, false);
        return this.ctx.fail("BAD_MANIFEST", `data pages at image offset 0x${off.toString(16)} lie in a chunk the manifest says is all zero`);
      }
      src = got.addr + (off - c * this.chunkSize);
    } else {
      const got = chunks.map((c) => {
        const h = this.hashes[c];
        return h ? this.t.fetcher.cache.peek(h) : undefined;
      });
      // A chunk that arrived earlier may have been evicted since (a huge page waiting for its
      // others): ask for it again; the pages stay in flight.
      if (chunks.some((c, j) => this.hashes[c] && got[j] === undefined)) return this.piece(region, k, n, chunks, true, false);
      // Assemble the huge page from its chunks (zero pages are zero bytes in a chunk; a null chunk is all zero).
      this.staging ??= new NativeBuffer(ps);
      const st = this.staging.bytes;
      for (let j = 0; j < chunks.length; j++) {
        const at = chunks[j]! * this.chunkSize - off;
        const c = got[j];
        if (c === undefined) st.fill(0, at, Math.min(ps, at + this.chunkSize));
        else st.set(new Uint8Array(toArrayBuffer(c.addr as Pointer, 0, c.length)), at);
      }
      src = this.staging.address as number;
    }
    const r = this.vm.deliver(region, k, n, src);
    if (installFailed(r)) return this.ctx.fail("SYSCALL", `installing pages from ${this.t.ref} failed: ${errnoName(installErrno(r))}`);
    if (this.inline > 0) return; // the fault path that asked serves retries and detaches itself
    this.ctx.delivered();
    if (r !== GONE && r !== AGAIN && this.t.sweep) this.scheduleSweep();
  }

  // ---- background completion (--populate background) ----------------------------------------

  private scheduleSweep(): void {
    if (this.sweepScheduled || this.done) return;
    this.sweepScheduled = true;
    this.ctx.loop.after(0, () => {
      this.sweepScheduled = false;
      this.sweep();
    });
  }

  /** Asks for the next missing pages in sweep order while the window has room. */
  private sweep(): void {
    if (this.done) return;
    const regions = this.vm.table.regions;
    const order = this.sweepOrder;
    while (!this.done && !this.passOver && this.sweepOutstanding < SWEEP_WINDOW_CHUNKS) {
      if (!order.next(this.regionDone)) {
        this.passOver = true;
        break;
      }
      const region = regions[order.unit]!;
      const from = order.from;
      const to = order.to;
      // Zero pages go in here; missing data pages are requested (as background) through request().
      for (let p = from; p < to; p++) {
        if (region.state[p] === PAGE_MISSING && !region.isZeroPage(p)) {
          let e = p + 1;
          while (e < to && region.state[e] === PAGE_MISSING && !region.isZeroPage(e)) e++;
          for (let q = p; q < e; q++) region.setState(q, PAGE_IN_FLIGHT);
          this.request(region, p, e - p, false, true);
          p = e - 1;
        }
      }
      if (this.done) return;
      const r = this.vm.installMissing(region, from, to, 0);
      if (r === AGAIN) {
        // A REMOVE is pending; the VM's owner reads it before our next turn, then this span again.
        order.again();
        this.ctx.loop.after(1, () => this.scheduleSweep());
        return;
      }
    }
    if (this.done) return;
    // Retries met inside request() (inline) and completion are for the VM's owner to act upon.
    if (this.vm.table.complete || this.vm.retry.length) this.ctx.delivered();
    else if (this.passOver && this.sweepOutstanding === 0) {
      // A pass is over; pages that met a pending REMOVE went back to missing: one more pass.
      this.passOver = false;
      if (this.vm.table.settledPages < this.vm.table.totalPages) this.ctx.loop.after(1, () => this.scheduleSweep());
    }
  }

  close(): void {
    this.done = true;
    this.staging?.free();
    this.staging = undefined;
  }
}
