// Firecracker's UFFD handshake body: a JSON array of GuestRegionUffdMapping.
// Accepts every released wire format (v1.1–1.6: three fields; v1.7–1.11: page_size_kib in
// bytes; v1.12+: page_size and page_size_kib) and tolerates unknown fields.
import { z } from "zod";
import { HandshakeError } from "./errors.ts";

export const PAGE_4K = 4096;
export const PAGE_2M = 2 * 1024 * 1024;
/** Firecracker sends far less; the cap bounds what a hostile peer can make us buffer. */
export const MAX_HANDSHAKE_BYTES = 64 * 1024;
export const MAX_REGIONS = 1024;

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

/**
 * Finds where the top-level JSON value ends without parsing it, so a body split over several
 * reads is recognised, and rejects integers beyond 2^53 before JSON.parse would round them.
 */
export function scanJson(bytes: Uint8Array): ScanResult {
  let i = 0;
  while (i < bytes.length && isSpace(bytes[i]!)) i++;
  if (i === bytes.length) return { state: "incomplete" };
  if (bytes[i] !== 0x5b /* [ */) return { state: "invalid", reason: "not a JSON array" };
  let depth = 0;
  let inString = false;
  for (; i < bytes.length; i++) {
    const c = bytes[i]!;
    if (inString) {
      if (c === 0x5c /* \ */) i++;
      else if (c === 0x22 /* " */) inString = false;
      continue;
    }
    if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) depth++;
    else if (c === 0x5d || c === 0x7d) {
      depth--;
      if (depth === 0) return { state: "complete", end: i + 1 };
      if (depth < 0) return { state: "invalid", reason: "unbalanced brackets" };
    } else if ((c >= 0x30 && c <= 0x39) || c === 0x2d) {
      let j = i;
      while (j < bytes.length && isNumberChar(bytes[j]!)) j++;
      if (j === bytes.length) return { state: "incomplete" };
      const token = new TextDecoder().decode(bytes.subarray(i, j));
      if (/^-?\d+$/.test(token) && BigInt(token) > BigInt(Number.MAX_SAFE_INTEGER)) {
        return { state: "invalid", reason: `number ${token} is larger than 2^53` };
      }
      i = j - 1;
    } else if (c < 0x20 && !isSpace(c)) {
      return { state: "invalid", reason: `control byte 0x${c.toString(16)} outside a string` };
    }
  }
  return { state: "incomplete" };
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
