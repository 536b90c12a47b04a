// The source port: what a page source is, and what it may use of the VM it serves. Sources
// (src/sources/, src/postcopy/) implement it; the daemon and the scheduler consume it. This module
// imports only types from below it (core/, the image's zero map), so every side depends on it
// and it depends on none of them.
import type { EventLoop } from "../core/event-loop.ts";
import type { ErrorCode } from "../core/errors.ts";
import type { Fields, Logger } from "../core/log.ts";
import type { ZeroMap } from "./image/snapshot-image.ts";

// ---- page states (one byte per region page) --------------------------------------------------

export const PAGE_MISSING = 0;
export const PAGE_INSTALLED = 1;
/** The guest discarded it (UFFD_EVENT_REMOVE): it reads as zeros from now on, never as snapshot data. */
export const PAGE_REMOVED = 2;
/** Requested from a source that answers later; its bytes have not arrived yet. */
export const PAGE_IN_FLIGHT = 3;

// ---- what an install did (the sink's answer; small integers, so the fault path allocates nothing) ----

/** Every page is in place, each put there by this call. */
export const INSTALLED = 0;
/** Every page is in place, but some were there already (EEXIST): a vCPU waiting on them needs a wake. */
export const EXISTED = 1;
/** Stopped by an event pending in the kernel (EAGAIN, e.g. a REMOVE): retry once the uffd was read. */
export const AGAIN = 2;
/** The range is gone (ENOENT: unregistered or unmapped; ESRCH: the process is exiting). */
export const GONE = 3;
/**
 * One of INSTALLED, EXISTED, AGAIN, GONE — or, when the install failed, minus its errno
 * (`installFailed(r)`, `installErrno(r)`).
 */
export type InstallOutcome = number;
export const installFailed = (r: InstallOutcome): boolean => r < 0;
export const installErrno = (r: InstallOutcome): number => (r < 0 ? -r : 0);

// ---- backends: where a region's bytes come from ----------------------------------------------

interface BackendCommon {
  /** Bytes addressable by a region offset. */
  readonly size: number;
  /** 4 KiB pages the snapshot says are zero: installed as zero pages, never read or fetched. */
  readonly zero: ZeroMap;
  readonly description: string;
}

/** Every byte is mapped locally: pages are copied from `base + offset`. */
export interface ImageBackend extends BackendCommon {
  readonly kind: "image";
  /** Address of image byte 0 in our memory. */
  readonly base: number;
  /** True when bytes of zero pages also read as zero through `base` (raw holes do; mapped-ram may not). */
  readonly zeroBytesAreZero: boolean;
}

/** Bytes arrive later, through the VM's requester (a page server, an object store). */
export interface RemoteBackend extends BackendCommon {
  readonly kind: "remote";
}

export type PageBackend = ImageBackend | RemoteBackend;

// ---- the VM as a source sees it --------------------------------------------------------------

/** One registered region of a VM: its geometry and per-page state (the scheduler's Region). */
export interface PageRegion {
  readonly index: number;
  readonly base: number;
  readonly pageSize: number;
  /** Image offset of the region's first byte. */
  readonly offset: number;
  readonly pages: number;
  /** Image pages (4 KiB) per region page, and the image page of the region's first page. */
  readonly imagePagesPerPage: number;
  readonly firstImagePage: number;
  /** One byte per region page: PAGE_*. */
  readonly state: Uint8Array;
  /** Pages installed or removed. */
  readonly settled: number;
  readonly backend: PageBackend;
  isZeroPage(i: number): boolean;
  isMixedPage(i: number): boolean;
  setState(i: number, s: number): void;
}

export interface PageTableView {
  readonly regions: readonly PageRegion[];
  readonly totalPages: number;
  readonly settledPages: number;
  readonly complete: boolean;
}

/** What a requester may do to the VM it serves. */
export interface RequesterVm {
  readonly id: number;
  readonly table: PageTableView;
  readonly stats: { populatedPages: number };
  /** Faults waiting for a retry after a pending event (the owner serves them on `delivered()`). */
  readonly retry: { readonly length: number };
  /** Bytes for in-flight region pages [first, first+count) are at `src`: install them, waking waiters. */
  deliver(region: PageRegion, first: number, count: number, src: number): InstallOutcome;
  /** Installs missing zero pages of [from, to) and requests the missing data pages (`budget` 0: all). */
  installMissing(region: PageRegion, from: number, to: number, budget: number): InstallOutcome;
}

/** What a requester may use of the daemon: the VM's owner answers these. */
export interface RequesterContext {
  loop: EventLoop;
  logger: Logger;
  /** The VM cannot be served any more (e.g. no page server within the deadline): the owner fails it. `context`: the error's facts, as vm.failed's fields. */
  fail(code: ErrorCode, detail: string, context?: Fields): void;
  /** Call after deliveries: the owner serves retries and detaches a VM whose pages are all in place. */
  delivered(): void;
}

/** One VM's channel to a source that answers later. Pages it is asked for arrive through `RequesterVm.deliver`. */
export interface PageRequester {
  /**
   * Region pages [first, first+count) are wanted: all data pages, all marked PAGE_IN_FLIGHT by the
   * caller. `urgent`: a vCPU is waiting, send it before background work.
   */
  request(region: PageRegion, first: number, count: number, urgent: boolean): void;
  /** A vCPU now waits on an in-flight page: move its request ahead of background traffic. */
  hurry(region: PageRegion, page: number): void;
  /** The VM is detached or gone: stop, release everything. Idempotent. */
  close(): void;
}

// ---- sources ---------------------------------------------------------------------------------

/** A source that answers now: its pages are in our memory. */
export interface ImageSource {
  readonly kind: "image";
  readonly backend: ImageBackend;
}

/** A source that answers later: each VM gets a requester, and pages arrive when they arrive. */
export interface RemoteSource {
  readonly kind: "remote";
  readonly backend: RemoteBackend;
  openRequester(vm: RequesterVm, ctx: RequesterContext): PageRequester;
  /**
   * For the daemon's JIT warm-up (daemon/warmup.ts), before it listens: a requester running the
   * same code as openRequester's, over bytes of its own for `backend` (held here, never fetched),
   * so a restore's first faults do not run the remote path unoptimised. release() frees them
   * once the requester is closed.
   */
  warmUpRequester?(vm: RequesterVm, ctx: RequesterContext, backend: RemoteBackend): { requester: PageRequester; release(): void };
}

/** Where a listener's pages come from. */
export type PageSource = ImageSource | RemoteSource;

// ---- opening a source (what `--mem` names) ---------------------------------------------------

export interface OpenedSource {
  source: PageSource;
  /** One line for the log: what is served, how big, data vs zero. */
  summary: string;
  /** The summary's facts as fields of the daemon.listening event (docs/events.md). */
  fields?: Fields;
  close(): void;
  /** A working set the source carries (a store manifest's), prefetched unless --prefetch says otherwise. */
  prefetch?: Uint32Array;
  /** Called once the daemon's event loop exists, before it runs (sources with background upkeep). */
  attach?(loop: EventLoop): void;
}

export interface SourceOptions {
  ramblock?: string;
  tokenFile?: string;
  /** How long VMs may wait for an unreachable page server before they are killed. */
  deadlineMs: number;
  /** As given on the command line; undefined = the source's default (tcp:// pulls everything). */
  populate?: "none" | "background";
  logger: Logger;
  /** Object stores (src/sources/store/): host chunk cache, its size in bytes, S3 endpoint, GETs in flight. */
  cacheDir?: string;
  cacheSize?: number;
  s3Endpoint?: string;
  storeParallel?: number;
}
