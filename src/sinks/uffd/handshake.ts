// Firecracker's UFFD handshake body: a JSON array of GuestRegionUffdMapping.
// Accepts every released wire format (v1.1–1.6: three fields; v1.7–1.11: page_size_kib in
// bytes; v1.12+: page_size and page_size_kib) and tolerates unknown fields.
import { z } from "zod";
import { HandshakeError } from "../../core/errors.ts";

export const PAGE_4K = 4096;
export const PAGE_2M = 2 * 1024 * 1024;
/** Firecracker sends far less; the cap bounds what a hostile peer can make us buffer. */
export const MAX_HANDSHAKE_BYTES = 64 * 1024;
export const MAX_REGIONS = 1024;
/**
 * Reads a handshake may take: Firecracker sends it in one sendmsg. The budget bounds the work a
 * peer that drips its body (one byte per read) can make us do per connection.
 */
export const MAX_HANDSHAKE_MESSAGES = 64;

export interface RegionMapping {
  /** Start of the region in the VMM's address space. */
  base: number;
  size: number;
  /** Byte offset of the region's data in the image (raw file, or the chosen RAM block). */
  offset: number;
  pageSize: number;
}

const u53 = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

const regionSchema = z.looseObject({
  base_host_virt_addr: u53,
  size: u53.positive(),
  offset: u53,
  page_size: u53.optional(),
  page_size_kib: u53.optional(),
});

const bodySchema = z.array(regionSchema).min(1, "no regions").max(MAX_REGIONS, `more than ${MAX_REGIONS} regions`);

export type ScanResult = { state: "incomplete" } | { state: "complete"; end: number } | { state: "invalid"; reason: string };

const INCOMPLETE: ScanResult = { state: "incomplete" };
const SAFE_DIGITS_LIMIT = Number.MAX_SAFE_INTEGER;

/**
 * Finds where the top-level JSON array ends without parsing it, so a body split over several
 * reads is recognised; rejects integers beyond 2^53 before JSON.parse would round them, and
 * anything but whitespace after the array.
 *
 * Incremental: each feed() scans only the bytes that arrived since the last one (the state of a
 * string, an escape or a number cut by the end of a read is kept), so a peer that drips a large
 * body byte by byte costs linear time in total, not quadratic; nothing is allocated per token.
 */
export class JsonScanner {
  /** Bytes scanned so far (the next feed starts here). */
  private pos = 0;
  private started = false;
  private depth = 0;
  private inString = false;
  private escaped = false;
  /** Inside a number token: whether it is a plain integer so far, its value (exact up to 2^53). */
  private inNumber = false;
  private numberStart = 0;
  private plainInteger = false;
  private negative = false;
  private value = 0;
  private end = -1;
  private result: ScanResult = INCOMPLETE;

  /** Scans bytes[pos, length): `bytes` holds everything received so far (a growing buffer). */
  feed(bytes: Uint8Array, length: number = bytes.length): ScanResult {
    if (this.result.state === "invalid") return this.result;
    let i = this.pos;
    for (; i < length && this.end < 0; i++) {
      const c = bytes[i]!;
      if (!this.started) {
        if (isSpace(c)) continue;
        if (c !== 0x5b /* [ */) return this.fail(i + 1, "not a JSON array");
        this.started = true;
        this.depth = 1;
        continue;
      }
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === 0x5c /* \ */) this.escaped = true;
        else if (c === 0x22 /* " */) this.inString = false;
        continue;
      }
      if (this.inNumber) {
        if (isNumberChar(c)) {
          if (c >= 0x30 && c <= 0x39) {
            // value*10 + d is rounded above 2^53, but stays above MAX_SAFE exactly when the true value does.
            if (this.value <= SAFE_DIGITS_LIMIT) this.value = this.value * 10 + (c - 0x30);
          } else this.plainInteger = false;
          continue;
        }
        this.inNumber = false;
        if (this.plainInteger && !this.negative && this.value > SAFE_DIGITS_LIMIT) {
          const token = new TextDecoder().decode(bytes.subarray(this.numberStart, i));
          return this.fail(i, `number ${token} is larger than 2^53`);
        }
      }
      if (c === 0x22) this.inString = true;
      else if (c === 0x5b || c === 0x7b) this.depth++;
      else if (c === 0x5d || c === 0x7d) {
        this.depth--;
        if (this.depth === 0) this.end = i + 1;
      } else if ((c >= 0x30 && c <= 0x39) || c === 0x2d) {
        this.inNumber = true;
        this.numberStart = i;
        this.plainInteger = true;
        this.negative = c === 0x2d;
        this.value = c === 0x2d ? 0 : c - 0x30;
      } else if (c < 0x20 && !isSpace(c)) {
        return this.fail(i + 1, `control byte 0x${c.toString(16)} outside a string`);
      }
    }
    if (this.end >= 0) {
      // Only whitespace may follow the array (Firecracker sends nothing after it).
      for (; i < length; i++) {
        if (!isSpace(bytes[i]!)) return this.fail(i + 1, `bytes after the end of the JSON array (at byte ${i})`);
      }
      this.pos = i;
      this.result = { state: "complete", end: this.end };
      return this.result;
    }
    this.pos = i;
    return INCOMPLETE;
  }

  private fail(pos: number, reason: string): ScanResult {
    this.pos = pos;
    this.result = { state: "invalid", reason };
    return this.result;
  }
}

/** Scans a whole buffer at once (see JsonScanner). */
export function scanJson(bytes: Uint8Array): ScanResult {
  return new JsonScanner().feed(bytes);
}

function isSpace(c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}
function isNumberChar(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x2b || c === 0x2e || c === 0x65 || c === 0x45;
}

/** Parses and validates the body on its own (no image yet). Throws HandshakeError. */
export function parseHandshake(text: string): RegionMapping[] {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new HandshakeError(`handshake is not JSON: ${(e as Error).message}`);
  }
  const parsed = bodySchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const where = issue.path.length ? ` at ${issue.path.join(".")}` : "";
    throw new HandshakeError(`handshake body invalid${where}: ${issue.message}`, { path: issue.path.join(".") });
  }
  const regions = parsed.data.map((r, i): RegionMapping => {
    if (r.page_size !== undefined && r.page_size_kib !== undefined && r.page_size !== r.page_size_kib) {
      throw new HandshakeError(`region ${i}: page_size ${r.page_size} and page_size_kib ${r.page_size_kib} disagree`);
    }
    const pageSize = r.page_size ?? r.page_size_kib ?? PAGE_4K;
    if (pageSize !== PAGE_4K && pageSize !== PAGE_2M) {
      throw new HandshakeError(`region ${i}: page size ${pageSize} is neither 4 KiB nor 2 MiB`, { region: i, pageSize });
    }
    const region = { base: r.base_host_virt_addr, size: r.size, offset: r.offset, pageSize };
    if (region.base % pageSize || region.size % pageSize) {
      throw new HandshakeError(`region ${i}: base 0x${region.base.toString(16)} or size ${region.size} is not aligned to its page size ${pageSize}`, { region: i });
    }
    if (region.offset % PAGE_4K) {
      throw new HandshakeError(`region ${i}: offset ${region.offset} is not 4 KiB aligned`, { region: i });
    }
    if (region.base + region.size > Number.MAX_SAFE_INTEGER) {
      throw new HandshakeError(`region ${i}: end address beyond 2^53`, { region: i });
    }
    return region;
  });
  const byBase = regions.map((r, i) => ({ ...r, i })).sort((a, b) => a.base - b.base);
  for (let k = 1; k < byBase.length; k++) {
    const prev = byBase[k - 1]!;
    const cur = byBase[k]!;
    if (prev.base + prev.size > cur.base) {
      throw new HandshakeError(`regions ${prev.i} and ${cur.i} overlap in the VMM's address space`);
    }
  }
  return regions;
}

/** Checks the regions against the image they will be served from. */
export function checkRegionsFitImage(regions: RegionMapping[], imageSize: number): void {
  regions.forEach((r, i) => {
    if (r.offset + r.size > imageSize) {
      throw new HandshakeError(
        `region ${i} [offset ${r.offset}, +${r.size}) reaches past the end of the image (${imageSize} bytes)`,
        { region: i, offset: r.offset, size: r.size, imageSize },
        "REGION_OUT_OF_IMAGE",
      );
    }
  });
}
