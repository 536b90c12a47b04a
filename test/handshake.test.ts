// Unit tests of the handshake body: scanJson (where a body split over reads ends, numbers beyond
// 2^53 caught before JSON.parse rounds them) and parseHandshake / checkRegionsFitImage.
import { describe, expect, test } from "bun:test";
import { HandshakeError } from "../src/core/errors.ts";
import { checkRegionsFitImage, JsonScanner, MAX_REGIONS, PAGE_2M, PAGE_4K, parseHandshake, scanJson } from "../src/sinks/uffd/handshake.ts";

const MIB = 1024 * 1024;
const enc = (s: string) => new TextEncoder().encode(s);
const scan = (s: string) => scanJson(enc(s));

function refused(text: string, fragment: string | RegExp): HandshakeError {
  let caught: unknown;
  try {
    parseHandshake(text);
  } catch (e) {
    caught = e;
  }
  expect(caught, `accepted: ${text}`).toBeInstanceOf(HandshakeError);
  const err = caught as HandshakeError;
  expect(err.code).toBe("BAD_HANDSHAKE");
  if (typeof fragment === "string") expect(err.message).toContain(fragment);
  else expect(err.message).toMatch(fragment);
  return err;
}

const region = (base: number, size: number, offset: number, extra = "") =>
  `{"base_host_virt_addr":${base},"size":${size},"offset":${offset}${extra}}`;

describe("parseHandshake: Firecracker's wire formats", () => {
  test("v1.1-v1.6: three fields, the page size is 4 KiB", () => {
    const body = `[${region(0x7f00_0000_0000, 64 * MIB, 0)}]`;
    expect(parseHandshake(body)).toEqual([{ base: 0x7f00_0000_0000, size: 64 * MIB, offset: 0, pageSize: PAGE_4K }]);
  });

  test("v1.7-v1.11: page_size_kib, in bytes despite its name", () => {
    expect(parseHandshake(`[${region(0x1000_0000, 8 * MIB, 0, ',"page_size_kib":4096')}]`)[0]!.pageSize).toBe(PAGE_4K);
    expect(parseHandshake(`[${region(0x4000_0000, 8 * MIB, 0, ',"page_size_kib":2097152')}]`)[0]!.pageSize).toBe(PAGE_2M);
  });

  test("v1.12+: page_size and page_size_kib, equal", () => {
    const r = parseHandshake(`[${region(0x4000_0000, 8 * MIB, 2 * MIB, ',"page_size":2097152,"page_size_kib":2097152')}]`);
    expect(r).toEqual([{ base: 0x4000_0000, size: 8 * MIB, offset: 2 * MIB, pageSize: PAGE_2M }]);
    expect(parseHandshake(`[${region(4096, 4096, 0, ',"page_size":4096,"page_size_kib":4096')}]`)[0]!.pageSize).toBe(PAGE_4K);
  });

  test("page_size alone (no page_size_kib)", () => {
    expect(parseHandshake(`[${region(0x4000_0000, 2 * MIB, 0, ',"page_size":2097152')}]`)[0]!.pageSize).toBe(PAGE_2M);
  });

  test("page_size and page_size_kib that disagree are refused", () => {
    refused(`[${region(0x4000_0000, 2 * MIB, 0, ',"page_size":4096,"page_size_kib":2097152')}]`, "disagree");
  });

  test("unknown fields are tolerated and dropped (gpa_start, is_guest_memfd, nested values)", () => {
    const extra = ',"gpa_start":1048576,"is_guest_memfd":false,"future":{"list":[1,2,{"x":"]}"}],"s":"a\\"b"},"n":null';
    const r = parseHandshake(`[${region(0x2000_0000, 4 * MIB, 0, extra)},${region(0x3000_0000, 4 * MIB, 4 * MIB, ',"gpa_start":0')}]`);
    expect(r).toEqual([
      { base: 0x2000_0000, size: 4 * MIB, offset: 0, pageSize: PAGE_4K },
      { base: 0x3000_0000, size: 4 * MIB, offset: 4 * MIB, pageSize: PAGE_4K },
    ]);
  });

  test("whitespace and key order do not matter", () => {
    const r = parseHandshake(' [ {\n "offset" : 8192 ,\t"size": 4096, "base_host_virt_addr": 12288 } ] ');
    expect(r).toEqual([{ base: 12288, size: 4096, offset: 8192, pageSize: PAGE_4K }]);
  });
});

describe("parseHandshake: what it refuses", () => {
  test("not JSON, not an array, no regions, too many regions", () => {
    refused("hello", "not JSON");
    refused(region(4096, 4096, 0), /invalid/);
    refused("[]", "no regions");
    const many = Array.from({ length: MAX_REGIONS + 1 }, (_, i) => region((i + 1) * 8192, 4096, 0)).join(",");
    refused(`[${many}]`, `more than ${MAX_REGIONS} regions`);
    const ok = Array.from({ length: MAX_REGIONS }, (_, i) => region((i + 1) * 8192, 4096, 0)).join(",");
    expect(parseHandshake(`[${ok}]`)).toHaveLength(MAX_REGIONS);
  });

  test("a missing field, a wrong type", () => {
    refused('[{"base_host_virt_addr":4096,"size":4096}]', "offset");
    refused('[{"base_host_virt_addr":"0x1000","size":4096,"offset":0}]', /base_host_virt_addr.*expected number/);
    refused('[{"base_host_virt_addr":4096,"size":true,"offset":0}]', "size");
    refused(`[${region(4096, 4096, 0, ',"page_size":"4096"')}]`, "page_size");
  });

  test("negative numbers", () => {
    refused(`[${region(4096, 4096, -4096)}]`, "offset");
    refused(`[${region(-4096, 4096, 0)}]`, "base_host_virt_addr");
    refused(`[${region(4096, -4096, 0)}]`, "size");
  });

  test("non-integers (4096.5, 1e3 is fine as an integer value)", () => {
    refused(`[${region(4096, 4096.5, 0)}]`, "size");
    refused(`[${region(4096.5, 4096, 0)}]`, "base_host_virt_addr");
    refused(`[${region(4096, 4096, 0, ',"page_size":4096.5')}]`, "page_size");
    // JSON numbers written with an exponent are still integers by value.
    expect(parseHandshake('[{"base_host_virt_addr":4096,"size":4.096e3,"offset":0}]')[0]!.size).toBe(4096);
  });

  test("numbers beyond 2^53 that JSON.parse would round", () => {
    refused(`[${region(2 ** 53 + 2, 4096, 0)}]`, "base_host_virt_addr");
    refused(`[${region(4096, 4096, 0, ',"page_size":1e300')}]`, "page_size");
    refused(`[${region(4096, 4096, 0)}]`.replace('"offset":0', '"offset":18446744073709551615'), "offset");
  });

  test("size 0", () => {
    refused(`[${region(4096, 0, 0)}]`, "size");
  });

  test("page sizes other than 4 KiB and 2 MiB", () => {
    refused(`[${region(65536, 65536, 0, ',"page_size":65536')}]`, "neither 4 KiB nor 2 MiB");
    refused(`[${region(0x4000_0000, 1 << 30, 0, ',"page_size":1073741824')}]`, "neither 4 KiB nor 2 MiB");
    refused(`[${region(4096, 4096, 0, ',"page_size":0')}]`, "neither 4 KiB nor 2 MiB");
  });

  test("alignment: base and size to the page size, offset to 4 KiB", () => {
    refused(`[${region(4097, 4096, 0)}]`, "not aligned");
    refused(`[${region(4096, 100, 0)}]`, "not aligned");
    refused(`[${region(4096, 4096, 100)}]`, "not 4 KiB aligned");
    // 2 MiB pages need 2 MiB alignment of base and size.
    refused(`[${region(0x4000_1000, 2 * MIB, 0, ',"page_size":2097152')}]`, "not aligned");
    refused(`[${region(0x4000_0000, 3 * MIB, 0, ',"page_size":2097152')}]`, "not aligned");
    expect(parseHandshake(`[${region(0x4000_0000, 6 * MIB, 4 * MIB, ',"page_size":2097152')}]`)).toEqual([
      { base: 0x4000_0000, size: 6 * MIB, offset: 4 * MIB, pageSize: PAGE_2M },
    ]);
  });

  test("a region whose end is beyond 2^53", () => {
    const base = 2 ** 53 - 4096 * 4; // aligned, representable
    refused(`[${region(base, 8 * 4096, 0)}]`, "beyond 2^53");
    expect(parseHandshake(`[${region(base, 3 * 4096, 0)}]`)).toHaveLength(1); // ends at 2^53 - 4096
  });

  test("overlapping regions (in the VMM's address space) are refused", () => {
    refused(`[${region(MIB, MIB, 0)},${region(MIB + 4096, 4096, 0)}]`, "overlap");
    refused(`[${region(2 * MIB, MIB, 0)},${region(MIB, 2 * MIB, MIB)}]`, "overlap"); // out of order too
    refused(`[${region(MIB, MIB, 0)},${region(MIB, MIB, MIB)}]`, "overlap"); // same base
  });

  test("touching regions, and regions out of order, are fine and keep their order", () => {
    const r = parseHandshake(`[${region(8 * MIB, 4 * MIB, 4 * MIB)},${region(4 * MIB, 4 * MIB, 0)},${region(0x7f00_0000_0000, 4096, 8 * MIB)}]`);
    expect(r).toEqual([
      { base: 8 * MIB, size: 4 * MIB, offset: 4 * MIB, pageSize: PAGE_4K },
      { base: 4 * MIB, size: 4 * MIB, offset: 0, pageSize: PAGE_4K },
      { base: 0x7f00_0000_0000, size: 4096, offset: 8 * MIB, pageSize: PAGE_4K },
    ]);
  });

  test("regions may share image offsets (the handler does not require disjoint file ranges)", () => {
    expect(parseHandshake(`[${region(0, 4 * MIB, 0)},${region(8 * MIB, 4 * MIB, 0)}]`)).toHaveLength(2);
  });
});

describe("checkRegionsFitImage", () => {
  const regions = (...rs: [number, number, number][]) => parseHandshake(`[${rs.map(([b, s, o]) => region(b, s, o)).join(",")}]`);

  test("regions that end exactly at the image's end fit", () => {
    expect(() => checkRegionsFitImage(regions([0, 4 * MIB, 0], [8 * MIB, 4 * MIB, 4 * MIB]), 8 * MIB)).not.toThrow();
  });

  test("one page past the end is refused, naming the region", () => {
    let caught: unknown;
    try {
      checkRegionsFitImage(regions([0, 4 * MIB, 0], [8 * MIB, 4 * MIB, 4 * MIB + 4096]), 8 * MIB);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(HandshakeError);
    const err = caught as HandshakeError;
    expect(err.code).toBe("REGION_OUT_OF_IMAGE");
    expect(err.message).toContain("region 1");
    expect(err.message).toContain("past the end of the image");
    expect(err.message).toContain(`${8 * MIB} bytes`);
    expect(err.context).toMatchObject({ region: 1, offset: 4 * MIB + 4096, size: 4 * MIB, imageSize: 8 * MIB });
  });

  test("an offset beyond the image, and an image smaller than one region", () => {
    expect(() => checkRegionsFitImage(regions([0, 4096, 16 * MIB]), 8 * MIB)).toThrow(HandshakeError);
    expect(() => checkRegionsFitImage(regions([0, 16 * MIB, 0]), 8 * MIB)).toThrow(/region 0/);
  });

  test("2 MiB regions against an image that is not a multiple of 2 MiB", () => {
    const r = parseHandshake(`[${region(0x4000_0000, 4 * MIB, 0, ',"page_size":2097152')}]`);
    expect(() => checkRegionsFitImage(r, 4 * MIB)).not.toThrow();
    expect(() => checkRegionsFitImage(r, 4 * MIB - 4096)).toThrow(/past the end/);
  });
});

describe("scanJson", () => {
  const body = `[${region(0x7f12_3456_0000, 64 * MIB, 0, ',"page_size":4096,"page_size_kib":4096,"note":"a ] } [ { \\" \\\\ \\u005d","deep":{"a":[[1],[2,[3]]]}')},${region(0x7f22_0000_0000, 8 * MIB, 64 * MIB)}]`;

  test("a whole body is complete where it ends, and parses", () => {
    const r = scan(body);
    expect(r).toEqual({ state: "complete", end: body.length });
    expect(parseHandshake(body)).toHaveLength(2);
  });

  test("every proper prefix of a body is incomplete (a body split over several reads)", () => {
    const bytes = enc(body);
    for (let n = 0; n < bytes.length; n++) {
      const r = scanJson(bytes.subarray(0, n));
      if (r.state !== "incomplete") throw new Error(`prefix of ${n} bytes: ${JSON.stringify(r)} (${body.slice(0, n)})`);
    }
  });

  test("brackets and escaped quotes inside strings do not end the body", () => {
    for (const s of ['"]"', '"}"', '"\\"]"', '"\\\\"', '"[[[["', '"a\\"}]\\""']) {
      const text = `[{"k":${s}}]`;
      expect(scan(text), text).toEqual({ state: "complete", end: text.length });
      expect(scan(text.slice(0, -1)).state, text).toBe("incomplete");
    }
  });

  test("bytes after the body are refused; whitespace after it is fine", () => {
    for (const text of ["  [1,2]   trailing", "[1][2]", "[1]\n{}", "[1] 2"]) {
      const r = scan(text);
      expect(r.state, text).toBe("invalid");
      if (r.state === "invalid") expect(r.reason).toContain("after the end of the JSON array");
    }
    expect(scan("  [1,2] \n\t ")).toEqual({ state: "complete", end: 7 });
  });

  test("fed in pieces (any split, down to one byte per read) it gives the answer of one whole scan", () => {
    const texts = [
      body,
      `[${region(4096, 4096, 0, ',"x":9007199254740993')}]`,
      `[${region(4096, 4096, 0)}] junk`,
      '[{"k":"a\\"}]',
      '[{"k":"\\\"]"}]',
      "[1,\u0001]",
    ];
    for (const text of texts) {
      const bytes = enc(text);
      const whole = scanJson(bytes);
      for (const step of [1, 2, 3, 7, 64]) {
        const scanner = new JsonScanner();
        let r = scanner.feed(bytes, 0);
        // Feeding goes on after "complete": bytes that arrive after the array are still refused.
        for (let n = step; r.state !== "invalid" && n < bytes.length + step; n += step) r = scanner.feed(bytes, Math.min(n, bytes.length));
        expect(r, `${text} in steps of ${step}`).toEqual(whole);
      }
    }
  });

  test("whitespace only, or nothing, is incomplete; anything but an array is invalid", () => {
    expect(scan("").state).toBe("incomplete");
    expect(scan(" \n\t ").state).toBe("incomplete");
    for (const s of ["{}", "1", '"x"', "\u00ff[", "null"]) {
      const r = scan(s);
      expect(r.state, s).toBe("invalid");
      if (r.state === "invalid") expect(r.reason).toContain("not a JSON array");
    }
  });

  test("a control byte outside a string is invalid", () => {
    const r = scanJson(Uint8Array.from([0x5b, 0x31, 0x01, 0x5d]));
    expect(r.state).toBe("invalid");
  });

  test("a number cut by the end of the read is incomplete, not judged", () => {
    expect(scan("[9007199254740").state).toBe("incomplete");
    expect(scan('[{"size":4096').state).toBe("incomplete");
  });

  test("integers beyond 2^53 are invalid anywhere, even inside unknown nested fields", () => {
    const big = "9007199254740993"; // 2^53 + 1: JSON.parse would make it 2^53
    for (const text of [
      `[${big}]`,
      `[${region(4096, 4096, 0).replace('"offset":0', `"offset":${big}`)}]`,
      `[${region(4096, 4096, 0, `,"future":{"deep":[1,{"x":${big}}]}`)}]`,
      `[${region(4096, 4096, 0, ',"u64max":18446744073709551615')}]`,
      `[${region(4096, 4096, 0, ',"pow":9007199254740992')}]`, // exactly 2^53
    ]) {
      const r = scan(text);
      expect(r.state, text).toBe("invalid");
      if (r.state === "invalid") expect(r.reason).toContain("larger than 2^53");
    }
    // Split just before the end of such a number: still waiting, then invalid once it ends.
    const split = `[{"x":${big}`;
    expect(scan(split).state).toBe("incomplete");
    expect(scan(`${split},`).state).toBe("invalid");
  });

  test("2^53 - 1 is fine; digits inside strings are not numbers", () => {
    const max = `[${region(4096, 4096, 0, ',"n":9007199254740991,"s":"99999999999999999999999"')}]`;
    expect(scan(max)).toEqual({ state: "complete", end: max.length });
  });

  test("negative and fractional numbers are left to the schema", () => {
    const text = `[${region(4096, 4096, -4096, ',"f":4096.5,"e":-1.5e-7')}]`;
    expect(scan(text)).toEqual({ state: "complete", end: text.length });
    refused(text, "offset");
  });
});
