// Gets chunks for every VM of the daemon: from this process's memory, the host chunk cache, or
// the store. One GET per chunk however many faults (of however many VMs) wait on it; a bounded
// number of GETs in flight, with room always kept for faults; background fetches (prefetch,
// population) in the order asked. Every fetched chunk is verified (decodeChunk: length and
// SHA-256 after decompression) before anyone sees it. Failed GETs are retried with exponential
// backoff and jitter until the deadline; a missing or persistently corrupt chunk fails at once.
import type { EventLoop } from "../../core/event-loop.ts";
import type { Logger } from "../../core/log.ts";
import type { ChunkCache, LocalChunk } from "./chunk-cache.ts";
import { StoreError } from "./errors.ts";
import { chunkKey, decodeChunk } from "./format.ts";
import { type ObjectStore, PermanentStoreError } from "./stores.ts";

export type ChunkCallback = (err: StoreError | undefined, chunk: LocalChunk | undefined) => void;

export interface FetcherOptions {
  /** GETs in flight at once. */
  parallel: number;
  /** How long a chunk may stay unobtainable (store down, errors) before its waiters fail. */
  deadlineMs: number;
  logger: Logger;
}

const RETRY_FIRST_MS = 50;
const RETRY_MAX_MS = 2000;
/** Fetches of one chunk that decoded badly, in a row, before it is declared corrupt in the store. */
const MAX_BAD_FETCHES = 3;
/** Bytes of fetched chunks held in memory, not yet written to the cache, before writes stop waiting for a quiet moment (at most the cache's size). */
const MAX_UNWRITTEN_BYTES = 128 * 1024 * 1024;
/**
 * Cache writes wait until no VM has asked for a chunk for this long (and no GET is in flight):
 * a restore shares this thread, and measured, writing a cold restore's chunks while its guest
 * still ran cost that guest a third of its time (touch time 287 ms vs 184 ms, RGW bench, 4 rounds).
 */
const WRITE_QUIET_MS = 100;
/** A GET with no answer after this long is abandoned and retried (a stalled store). */
const ATTEMPT_TIMEOUT_MS = 5000;
const MIN_ATTEMPT_MS = 100;
/** GET slots background fetches leave free, so a fault never queues behind prefetch. */
const URGENT_RESERVE = 2;

interface Pending {
  store: ObjectStore;
  hash: string;
  length: number;
  /** What the chunk is, for messages ("chunk 12 of vm1"). */
  label: string;
  urgent: boolean;
  waiters: ChunkCallback[];
  queued: boolean;
  /** When its GETs started failing (the deadline counts from there, not from the queue). */
  failingSince: number | undefined;
  warned: boolean;
  attempts: number;
  badFetches: number;
  lastError: string;
  /** The last failure's context (a bad chunk's `contentHash`), for the final error. */
  lastContext: Record<string, unknown>;
  /** Attempts abandoned with no answer (a stalled store), as opposed to answered with an error. */
  timeouts: number;
}

export class ChunkFetcher {
  private readonly pending = new Map<string, Pending>();
  private readonly urgentQueue: Pending[] = [];
  private readonly backgroundQueue: Pending[] = [];
  private inFlight = 0;
  private loop: EventLoop | undefined;
  readonly counters = { gets: 0, bytes: 0, retries: 0, badFetches: 0, coalesced: 0, decodeMs: 0, maxInFlight: 0 };
  /** Each successful GET's latency (request to last byte), ms: the store's share of a restore. */
  readonly getMs: number[] = [];
  /** When the first GET went out and the last chunk was ready (performance.now()). */
  firstGetAt = 0;
  lastReadyAt = 0;

  constructor(
    readonly cache: ChunkCache,
    private readonly opts: FetcherOptions,
  ) {}

  /** The daemon's loop: while GETs are in flight it is kept turning so their completions run. */
  attach(loop: EventLoop): void {
    if (this.loop === loop) return;
    // GETs started before (a working set's, fetched from startup) keep the new loop turning too.
    if (this.loop !== undefined) this.loop.asyncPending -= this.pending.size;
    loop.asyncPending += this.pending.size;
    this.loop = loop;
    if (this.warming.length) this.startBackground();
    this.scheduleWrites();
  }

  private readonly warming: { hash: string; length: number }[] = [];
  private backgroundOn = false;
  /** When a VM last asked for a chunk (performance.now()): cache writes wait for a quiet moment. */
  private lastAskedAt = 0;
  private writeTimer = false;

  /** Cache upkeep between faults: write fetched chunks to the cache; map and verify cached ones ahead of need. */
  private readonly background = (): boolean => {
    const now = performance.now();
    if (this.writeDue(now)) this.cache.persist();
    else {
      const w = this.warming.shift();
      if (w !== undefined) this.cache.lookup(w.hash, w.length);
    }
    const more = this.warming.length > 0 || this.writeDue(now);
    if (!more) {
      // Off while only deferred writes remain: on again once they are due.
      this.loop?.removeBackground(this.background);
      this.backgroundOn = false;
      this.scheduleWrites();
    }
    return more;
  };

  /**
   * Fetched chunks are written to the cache once no GET is in flight and no VM has asked for a
   * chunk for WRITE_QUIET_MS (a restore is running, and shares this thread), or at once when
   * too many bytes of them are held in memory.
   */
  private writeDue(now: number): boolean {
    if (!this.cache.persistPending) return false;
    if (this.heldTooMuch()) return true;
    return this.pending.size === 0 && now - this.lastAskedAt >= WRITE_QUIET_MS;
  }

  /** Fetched bytes held in memory past what the cache may hold (or MAX_UNWRITTEN_BYTES): written even while busy. */
  private heldTooMuch(): boolean {
    return this.cache.unpersistedBytes > Math.min(MAX_UNWRITTEN_BYTES, this.cache.maxBytes);
  }

  /** Turns cache upkeep on when writes are due, now or after the quiet time (a timer). */
  private scheduleWrites(): void {
    const loop = this.loop;
    if (loop === undefined || !this.cache.persistPending || this.pending.size > 0) return;
    const wait = WRITE_QUIET_MS - (performance.now() - this.lastAskedAt);
    if (wait <= 0) return this.startBackground();
    if (this.writeTimer) return;
    this.writeTimer = true;
    loop.after(Math.ceil(wait), () => {
      this.writeTimer = false;
      this.scheduleWrites();
    });
  }

  private startBackground(): void {
    if (this.backgroundOn || this.loop === undefined) return;
    this.backgroundOn = true;
    this.loop.addBackground(this.background);
  }

  /**
   * Maps and verifies the chunks of a snapshot the host cache already holds (give the working
   * set's first), so that no fault of a warm restore pays for hashing its chunk: the first
   * `syncBytes` now (before the daemon listens: verifying between faults would delay them), the
   * rest between faults. Returns the bytes verified now.
   */
  warm(chunks: { hash: string; length: number }[], syncBytes: number): number {
    let done = 0;
    let i = 0;
    for (; i < chunks.length && done < syncBytes; i++) {
      if (this.cache.lookup(chunks[i]!.hash, chunks[i]!.length) !== undefined) done += chunks[i]!.length;
    }
    this.warming.push(...chunks.slice(i));
    if (this.warming.length) this.startBackground();
    return done;
  }

  /**
   * Calls back with the verified chunk: synchronously when this process or the host cache has
   * it (returns true), later otherwise (returns false).
   */
  acquire(store: ObjectStore, hash: string, length: number, label: string, urgent: boolean, cb: ChunkCallback): boolean {
    this.lastAskedAt = performance.now();
    // A chunk being fetched is joined first: looking for it in the host cache costs a failed
    // open() and a thrown error, and a cold restore asks for its chunks many times while they
    // are on their way.
    let p = this.pending.get(hash);
    if (p === undefined) {
      const local = this.cache.lookup(hash, length);
      if (local !== undefined) {
        cb(undefined, local);
        return true;
      }
    } else {
      this.counters.coalesced++;
      p.waiters.push(cb);
      if (urgent) this.hurry(hash);
      return false;
    }
    p = { store, hash, length, label, urgent, waiters: [cb], queued: true, failingSince: undefined, warned: false, attempts: 0, badFetches: 0, lastError: "", lastContext: {}, timeouts: 0 };
    this.pending.set(hash, p);
    // Until it is settled, the daemon's loop hands the thread to Bun every turn: GET completions
    // (and retry timers) run there.
    if (this.loop !== undefined) this.loop.asyncPending++;
    (urgent ? this.urgentQueue : this.backgroundQueue).push(p);
    this.pump();
    return false;
  }

  /** A vCPU now waits on this chunk: if its GET has not started, it goes before background ones. */
  hurry(hash: string): void {
    const p = this.pending.get(hash);
    if (p === undefined || p.urgent) return;
    p.urgent = true;
    if (!p.queued) return;
    const i = this.backgroundQueue.indexOf(p);
    if (i >= 0) this.backgroundQueue.splice(i, 1);
    this.urgentQueue.push(p);
    this.pump();
  }

  private pump(): void {
    const max = this.opts.parallel;
    while (this.inFlight < max) {
      let p = this.urgentQueue.shift();
      if (p === undefined) {
        if (this.inFlight >= Math.max(1, max - URGENT_RESERVE)) break;
        p = this.backgroundQueue.shift();
        if (p === undefined) break;
      }
      p.queued = false;
      this.start(p);
    }
  }

  private start(p: Pending): void {
    this.inFlight++;
    if (this.inFlight > this.counters.maxInFlight) this.counters.maxInFlight = this.inFlight;
    if (this.firstGetAt === 0) this.firstGetAt = performance.now();
    p.attempts++;
    this.counters.gets++;
    const key = chunkKey(p.hash);
    // A GET that hangs (a stalled gateway) is abandoned after a while and counts as a failure:
    // only failures move a VM toward its deadline, and a hang must too.
    const left = p.failingSince === undefined ? this.opts.deadlineMs : this.opts.deadlineMs - (performance.now() - p.failingSince);
    const limit = Math.max(MIN_ATTEMPT_MS, Math.min(ATTEMPT_TIMEOUT_MS, left));
    let settled = false;
    const attemptAt = performance.now();
    const settle = (): boolean => {
      if (settled) return false;
      settled = true;
      clearTimeout(timer);
      this.inFlight--;
      return true;
    };
    const timer = setTimeout(() => {
      // Silent since it was sent: the store has been failing us since then.
      p.failingSince ??= attemptAt;
      if (!settle()) return;
      p.timeouts++;
      failed(new StoreError("STORE_UNAVAILABLE", `${p.store.url}: GET ${key}: no answer within ${Math.round(limit)} ms`, { key }));
    }, limit);
    const failed = (e: unknown) => {
      p.lastError = (e as Error).message;
      p.lastContext = e instanceof StoreError ? e.context : {};
      if (e instanceof PermanentStoreError) return this.finish(p, e);
      p.failingSince ??= performance.now();
      if (performance.now() - p.failingSince >= this.opts.deadlineMs) {
        return this.finish(p, new StoreError("STORE_UNAVAILABLE", `${p.label}: not obtainable within ${this.opts.deadlineMs} ms after ${p.attempts} attempts (last: ${p.lastError})`, {
          ...p.lastContext, key, url: p.store.url, hash: p.hash, attempts: p.attempts, timeouts: p.timeouts, deadlineMs: this.opts.deadlineMs,
        }));
      }
      if (!p.warned) this.opts.logger.warn("store.get_retrying", `${p.label}: ${p.lastError}; retrying for up to ${this.opts.deadlineMs} ms`, { chunk: p.label, reason: p.lastError, deadlineMs: this.opts.deadlineMs });
      p.warned = true;
      this.retry(p);
    };
    p.store.get(key).then(
      (object) => {
        if (!settle()) return;
        if (object === undefined) {
          return this.finish(p, new StoreError("NOT_FOUND", `${p.label} is missing from ${p.store.url} (no object ${key})`, { key, url: p.store.url, hash: p.hash }));
        }
        this.counters.bytes += object.length;
        this.getMs.push(performance.now() - attemptAt);
        let bytes: Uint8Array;
        const buffer = this.cache.pool.take(p.length);
        const t0 = performance.now();
        try {
          bytes = decodeChunk(object, p.hash, p.length, `${p.store.url}/${key}`, buffer.bytes);
          this.counters.decodeMs += performance.now() - t0;
        } catch (e) {
          this.cache.pool.give(buffer);
          this.counters.badFetches++;
          p.badFetches++;
          p.lastError = (e as Error).message;
          p.lastContext = e instanceof StoreError ? e.context : {};
          if (p.badFetches >= MAX_BAD_FETCHES) {
            return this.finish(p, new StoreError("BAD_CHUNK", `${p.label}: ${p.lastError} (${p.badFetches} fetches in a row)`, {
              ...p.lastContext, key, url: p.store.url, hash: p.hash, fetches: p.badFetches,
            }));
          }
          this.opts.logger.warn("store.bad_chunk", `${p.label}: ${p.lastError}; fetching it again`, { chunk: p.label, reason: p.lastError });
          return this.retry(p);
        }
        // Raw chunks are used from the GET's own bytes; the buffer goes back.
        const used = bytes.buffer === buffer.bytes.buffer;
        if (!used) this.cache.pool.give(buffer);
        this.lastReadyAt = performance.now();
        this.finish(p, undefined, this.cache.insert(p.hash, bytes, used ? buffer : undefined));
        if (this.heldTooMuch()) this.startBackground();
      },
      (e: unknown) => {
        if (settle()) failed(e);
      },
    );
  }

  /** Again after a backoff of 50 ms doubling to 2 s, each with ±50% jitter (no herd when a store comes back). */
  private retry(p: Pending): void {
    this.counters.retries++;
    const base = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** Math.min(10, p.attempts - 1));
    const left = this.opts.deadlineMs - (performance.now() - (p.failingSince ?? performance.now()));
    const delay = Math.max(0, Math.min(left, base * (0.5 + Math.random())));
    setTimeout(() => {
      p.queued = true;
      (p.urgent ? this.urgentQueue : this.backgroundQueue).unshift(p);
      this.pump();
    }, delay);
    this.pump();
  }

  private finish(p: Pending, err: StoreError | undefined, chunk?: LocalChunk): void {
    this.pending.delete(p.hash);
    if (this.loop !== undefined) this.loop.asyncPending--;
    if (this.pending.size === 0) this.scheduleWrites();
    for (const cb of p.waiters.splice(0)) cb(err, chunk);
    this.pump();
  }

  get idle(): boolean {
    return this.pending.size === 0;
  }
}
