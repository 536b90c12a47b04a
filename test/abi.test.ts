// The C header is the ABI: every function it declares is bound in src/core/ffi.ts with matching
// argument and return types, nothing is bound that it does not declare, and the constants both
// sides use agree.
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { FFIType } from "bun:ffi";
import * as ffi from "../src/core/ffi.ts";

const header = readFileSync(join(import.meta.dir, "..", "csrc", "snapload.h"), "utf8").replace(/\/\*[\s\S]*?\*\//g, "");

/** name → [return type, parameter types], from the prototypes in the header. */
function prototypes(): Map<string, [string, string[]]> {
  const out = new Map<string, [string, string[]]>();
  for (const m of header.matchAll(/^(\w[\w ]*?)\s+(sl_\w+)\(([^)]*)\);/gm)) {
    const params = m[3]!.trim() === "void" ? [] : m[3]!.split(",").map((p) => p.trim());
    out.set(m[2]!, [m[1]!.trim(), params]);
  }
  return out;
}

/** The FFI type a C parameter must be bound as. */
function ffiTypeOf(param: string): FFIType {
  // The parameter's declared type without its name: "const char *path" → "const char *".
  const type = param.includes("*") ? param.slice(0, param.lastIndexOf("*") + 1).replace(/\s+/g, " ") : param.split(/\s+/)[0]!;
  if (type === "const char *") return FFIType.cstring;
  if (type.endsWith("*")) return FFIType.ptr;
  const map: Record<string, FFIType> = { int: FFIType.i32, int32_t: FFIType.i32, uint32_t: FFIType.u32, uint64_t: FFIType.u64 };
  const t = map[type];
  if (t === undefined) throw new Error(`no FFI mapping for C type '${type}' (parameter '${param}')`);
  return t;
}

function define(name: string): number {
  const m = header.match(new RegExp(`^#define ${name} (\\d+)$`, "m"));
  if (!m) throw new Error(`csrc/snapload.h has no #define ${name}`);
  return Number(m[1]);
}

describe("C ABI", () => {
  const protos = prototypes();
  const bound = ffi.FFI_SYMBOLS as Record<string, { args: readonly FFIType[]; returns: FFIType }>;

  test("the header declares the functions (the parser is not reading nothing)", () => {
    expect(protos.size).toBeGreaterThan(40);
    expect(protos.get("sl_uffd_copy")).toEqual(["int", ["int uffd", "uint64_t dst", "const void *src", "uint64_t len", "int mode", "uint64_t *out_done"]]);
  });

  test("every declared function is bound, and nothing else", () => {
    expect(Object.keys(bound).sort()).toEqual([...protos.keys()].sort());
  });

  test("each binding has the header's argument and return types", () => {
    const wrong: string[] = [];
    for (const [name, [ret, params]] of protos) {
      const b = bound[name];
      if (b === undefined) continue;
      const want = params.map(ffiTypeOf);
      if (ret !== "int") wrong.push(`${name} returns ${ret}; every function returns int (-errno)`);
      if (b.returns !== FFIType.i32) wrong.push(`${name} is bound returning ${b.returns}, not i32`);
      if (JSON.stringify(b.args) !== JSON.stringify(want)) wrong.push(`${name}: bound (${b.args.join(", ")}), header (${want.join(", ")})`);
    }
    expect(wrong).toEqual([]);
  });

  test("the constants agree", () => {
    expect(ffi.ABI_VERSION).toBe(define("SL_ABI_VERSION"));
    expect(ffi.sl.sl_abi_version()).toBe(define("SL_ABI_VERSION"));
    expect(ffi.UFFD_MSG_SIZE).toBe(define("SL_UFFD_MSG_SIZE"));
    expect(ffi.SL_EVENT_SIZE).toBe(define("SL_EVENT_SIZE"));
    expect(ffi.SL_EPOLL_MAX_EVENTS).toBe(define("SL_EPOLL_MAX_EVENTS"));
    expect(ffi.SL_MAX_FDS).toBe(define("SL_MAX_FDS"));
    expect(ffi.SL_UFFD_MODE_MISSING).toBe(define("SL_UFFD_MODE_MISSING"));
    expect(ffi.COPY_DONTWAKE).toBe(define("SL_UFFD_DONTWAKE"));
    expect([ffi.EPOLL_CTL_ADD, ffi.EPOLL_CTL_DEL, ffi.EPOLL_CTL_MOD]).toEqual([define("SL_EPOLL_ADD"), define("SL_EPOLL_DEL"), define("SL_EPOLL_MOD")]);
  });
});
