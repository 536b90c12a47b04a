// The host chunk cache: decompressed chunks on local disk, shared by every daemon on the host,
// surviving restarts. A file is created whole (temp file + rename) and never modified, so a
// reader sees a whole chunk or none; every file is re-hashed when a daemon first maps it, so a
// corrupted cache costs a refetch, never a wrong page. Chunks are installed straight from the
// file mapping, as pages of a local image are (a chunk just fetched is installed from its
// verified bytes while it is being written to the cache). LRU by modification time (touched on every use),
// evicted past --cache-size (this daemon unmaps it too; another daemon's mapping stays valid).
import { type Pointer, ptr, toArrayBuffer } from "bun:ffi";
import { mkdirSync, readdirSync, renameSync, statSync, unlinkSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { NativeBuffer, sl } from "../../core/ffi.ts";
import { mapReadOnly, openRegularFile } from "../image/snapshot-image.ts";
import { formatBytes, type Logger } from "../../core/log.ts";
import { sha256 } from "./format.ts";

/** Chunk bytes in our memory, ready for UFFDIO_COPY. */
export interface LocalChunk {
  readonly addr: number;
  readonly length: number;
  /** Keeps the bytes alive while they are not in a mapping (just fetched, not yet in the cache). */
  readonly keep?: Uint8Array;
  /** The pool buffer holding them, given back once the chunk is mapped from the cache. */
  readonly buffer?: PoolBuffer;
}

/** A decompression buffer of the pool: `length` bytes of our memory, page-aligned. */
export interface PoolBuffer {
  readonly bytes: Uint8Array;
  readonly length: number;
}

const HUGE_PAGE = 2 * 1024 * 1024;
/** Memory the pool takes from the system at once, cut into buffers. */
const SLAB_BYTES = 8 * 1024 * 1024;
const MADV_HUGEPAGE = 14;

/**
 * Decompression buffers, reused: fresh memory is slow to touch on a VM. A buffer is lent from
 * the fetch of a chunk until that chunk is mapped from the cache (or for good if it cannot be).
 * Holders of a chunk must look it up again (ChunkCache.peek) when they use it: the address of a
 * chunk moves from its buffer to its mapping between event-loop turns.
 *
 * Buffers are cut from slabs of transparent huge pages (madvise; the kernel's default policy here):
 * measured, the first touch of 4 KiB pages of fresh memory cost twice as much as decompressing
 * and hashing a cold restore's chunks into it (~100 ms of ~150 ms for 32 MiB), huge pages ~3 ms.
 * Slabs are kept for the daemon's life: the pool holds at most what was lent out at once.
 */
class BufferPool {
  private readonly free: PoolBuffer[] = [];
  private slab: { at: number; end: number } | undefined;
  take(length: number): PoolBuffer {
    const i = this.free.findIndex((b) => b.length >= length);
    if (i >= 0) return this.free.splice(i, 1)[0]!;
    // Whole pages: every buffer starts on a page (the last chunk of an image that is not a whole
    // number of pages, a file pushed --whole-file, has any length).
    const size = Math.ceil(length / 4096) * 4096;
    if (this.slab === undefined || this.slab.end - this.slab.at < size) this.slab = newSlab(Math.max(SLAB_BYTES, Math.ceil(size / HUGE_PAGE) * HUGE_PAGE));
    const at = this.slab.at;
    this.slab.at += size;
    return { bytes: new Uint8Array(toArrayBuffer(at as Pointer, 0, size)), length: size };
  }
  give(b: PoolBuffer): void {
    this.free.push(b);
  }
}

/** `bytes` of anonymous memory (never freed), huge-page aligned and advised to use huge pages. */
function newSlab(bytes: number): { at: number; end: number } {
  // One huge page more, to align; the part before the aligned start is never touched.
  const mem = new NativeBuffer(bytes + HUGE_PAGE);
  const at = Math.ceil((mem.address as number) / HUGE_PAGE) * HUGE_PAGE;
  // Best effort: without huge pages the buffers are ordinary pages, as before.
  sl.sl_madvise(at as Pointer, bytes, MADV_HUGEPAGE);
  return { at, end: at + bytes };
}

/** Temp files older than this are leftovers of a daemon that died mid-write. */
const STALE_TMP_MS = 10 * 60 * 1000;

export class ChunkCache {
  /** Chunks this process has mapped (or holds in memory), by hash; a mapping goes when its file is evicted. */
  private readonly local = new Map<string, LocalChunk>();
  /** Files in the cache directory by hash, least recently used first (Map keeps insertion order). */
  private readonly files = new Map<string, number>();
  private bytes = 0;
  private writeFailedLogged = false;
  readonly counters = { hits: 0, misses: 0, inserted: 0, evicted: 0, corrupt: 0 };

  constructor(
    readonly dir: string,
    readonly maxBytes: number,
    private readonly logger: Logger,
  ) {
    mkdirSync(join(dir, "chunks"), { recursive: true });
    this.scan();
  }

  private path(hash: string): string {
    return join(this.dir, "chunks", hash.slice(0, 2), hash);
  }

  /** Learns what an earlier run (or another daemon) left, oldest first. */
  private scan(): void {
    const found: { hash: string; size: number; mtime: number }[] = [];
    const root = join(this.dir, "chunks");
    const now = Date.now();
    for (const sub of readdirSync(root)) {
      let names: string[];
      try {
        names = readdirSync(join(root, sub));
      } catch {
        continue;
      }
      for (const name of names) {
        const p = join(root, sub, name);
        try {
          const st = statSync(p);
          if (name.startsWith(".")) {
            if (now - st.mtimeMs > STALE_TMP_MS) unlinkSync(p);
            continue;
          }
          if (/^[0-9a-f]{64}$/.test(name)) found.push({ hash: name, size: st.size, mtime: st.mtimeMs });
        } catch {
          // Evicted by another daemon meanwhile.
        }
      }
    }
    found.sort((a, b) => a.mtime - b.mtime);
    for (const f of found) {
      this.files.set(f.hash, f.size);
      this.bytes += f.size;
    }
    this.evict();
  }

  /** The chunk if this process already has it. */
  peek(hash: string): LocalChunk | undefined {
    return this.local.get(hash);
  }

  /**
   * The chunk from memory or the disk cache, verified; undefined when it must be fetched.
   * A cache file whose bytes do not hash to its name is deleted (and logged), never used.
   */
  lookup(hash: string, length: number): LocalChunk | undefined {
    const mine = this.local.get(hash);
    if (mine !== undefined) return mine;
    const path = this.path(hash);
    let fd: number;
    let size: number;
    try {
      ({ fd, size } = openRegularFile(path));
    } catch {
      this.forget(hash);
      this.counters.misses++;
      return undefined;
    }
    let addr = 0;
    try {
      if (size !== length) return this.corrupt(hash, path, `${size} bytes, expected ${length}`);
      addr = mapReadOnly(fd, length, 0, path);
    } catch (e) {
      this.logger.warn("store.cache_unreadable", `chunk cache: cannot map ${path}: ${(e as Error).message}; fetching it again`, { path, reason: (e as Error).message });
      return undefined;
    } finally {
      sl.sl_close(fd);
    }
    const got = sha256(new Uint8Array(toArrayBuffer(addr as Pointer, 0, length)));
    if (got !== hash) {
      sl.sl_unmap(addr as Pointer, length);
      return this.corrupt(hash, path, `content hashes to ${got.slice(0, 16)}…`);
    }
    this.counters.hits++;
    this.touch(hash, size, path);
    const chunk = { addr, length };
    this.local.set(hash, chunk);
    return chunk;
  }

  private corrupt(hash: string, path: string, why: string): undefined {
    this.counters.corrupt++;
    this.logger.warn("store.cache_corrupt", `chunk cache: ${path} is corrupt (${why}); deleted, fetching the chunk from the store again`, { path, reason: why });
    try {
      unlinkSync(path);
    } catch {}
    this.forget(hash);
    return undefined;
  }

  /**
   * Takes verified chunk bytes: usable at once (installed straight from them), written to the
   * cache (atomically) and mapped from there by persist(), off the fault path.
   */
  insert(hash: string, bytes: Uint8Array, buffer?: PoolBuffer): LocalChunk {
    const have = this.local.get(hash);
    if (have !== undefined) {
      if (buffer !== undefined) this.pool.give(buffer);
      return have;
    }
    const chunk: LocalChunk = { addr: ptr(bytes) as number, length: bytes.length, keep: bytes, ...(buffer !== undefined ? { buffer } : {}) };
    this.local.set(hash, chunk);
    this.unpersisted.push(hash);
    this.unpersistedBytes += bytes.length;
    return chunk;
  }

  private readonly unpersisted: string[] = [];
  readonly pool = new BufferPool();

  get persistPending(): boolean {
    return this.unpersisted.length > 0;
  }

  /** Bytes of fetched chunks not yet written to the cache (held in memory meanwhile). */
  unpersistedBytes = 0;

  /**
   * Writes one fetched chunk to the cache and swaps its bytes for the file mapping. If the cache
   * cannot take it (disk full, read-only), the chunk stays in memory: the restore goes on, only
   * the next daemon will fetch it again. Returns true while more are waiting.
   */
  persist(): boolean {
    const hash = this.unpersisted.shift();
    if (hash === undefined) return false;
    const mem = this.local.get(hash);
    if (mem?.keep === undefined) return this.unpersisted.length > 0;
    const bytes = mem.keep;
    this.unpersistedBytes -= bytes.length;
    const path = this.path(hash);
    const tmp = join(this.dir, "chunks", hash.slice(0, 2), `.${hash}.${process.pid}.${Math.random().toString(36).slice(2)}`);
    try {
      mkdirSync(join(this.dir, "chunks", hash.slice(0, 2)), { recursive: true });
      writeFileSync(tmp, bytes);
      renameSync(tmp, path);
      const { fd } = openRegularFile(path);
      try {
        this.local.set(hash, { addr: mapReadOnly(fd, bytes.length, 0, path), length: bytes.length });
      } finally {
        sl.sl_close(fd);
      }
      if (mem.buffer !== undefined) this.pool.give(mem.buffer);
      this.counters.inserted++;
      this.touch(hash, bytes.length, path);
      this.evict(hash);
    } catch (e) {
      try {
        unlinkSync(tmp);
      } catch {}
      if (!this.writeFailedLogged) {
        this.writeFailedLogged = true;
        this.logger.warn("store.cache_write_failed", `chunk cache ${this.dir}: cannot write ${path} (${(e as Error).message}); keeping chunks in memory until it can`, { dir: this.dir, path, reason: (e as Error).message });
      }
    }
    return this.unpersisted.length > 0;
  }

  private touch(hash: string, size: number, path: string): void {
    if (this.files.has(hash)) this.files.delete(hash);
    else this.bytes += size;
    this.files.set(hash, size);
    try {
      // Other daemons (and the next start) order the cache by this.
      const now = new Date();
      utimesSync(path, now, now);
    } catch {}
  }

  private forget(hash: string): void {
    const size = this.files.get(hash);
    if (size === undefined) return;
    this.files.delete(hash);
    this.bytes -= size;
  }

  /** Deletes least recently used files until the cache fits (never `keep`, just inserted). */
  private evict(keep?: string): void {
    if (this.bytes <= this.maxBytes) return;
    for (const [hash, size] of this.files) {
      if (this.bytes <= this.maxBytes) break;
      if (hash === keep) continue;
      try {
        unlinkSync(this.path(hash));
      } catch {}
      this.files.delete(hash);
      this.bytes -= size;
      this.counters.evicted++;
      // Our mapping of it goes too, so the daemon's mappings stay within the cache size. Safe
      // between event-loop turns: users look chunks up when they install from them.
      const mine = this.local.get(hash);
      if (mine !== undefined && mine.keep === undefined) {
        sl.sl_unmap(mine.addr as Pointer, mine.length);
        this.local.delete(hash);
      }
    }
  }

  /** Unmaps every chunk this process mapped (the files stay): only once nothing installs from them any more. */
  close(): void {
    for (const c of this.local.values()) if (c.keep === undefined) sl.sl_unmap(c.addr as Pointer, c.length);
    this.local.clear();
  }

  describe(): string {
    return `chunk cache ${this.dir} (${formatBytes(this.bytes)} of ${formatBytes(this.maxBytes)})`;
  }
}
