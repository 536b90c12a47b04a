// src/index.ts is the library surface: small, and every name in it used — by the CLI (src/cli/)
// or by the tests — and importable on its own.
import { expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as library from "../src/index.ts";
import { ROOT } from "./harness.ts";

function sources(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: "utf8" }).filter((f) => f.endsWith(".ts")).map((f) => join(dir, f));
}

test("every name src/index.ts exports is used by src/cli/ or test/", () => {
  const index = readFileSync(join(ROOT, "src/index.ts"), "utf8");
  const names = [...index.matchAll(/export \{([^}]*)\}/g)].flatMap((m) => m[1]!.split(",").map((n) => n.replace(/^\s*type\s+/, "").trim())).filter(Boolean);
  expect(names.length).toBeGreaterThan(0);
  const users = [...sources(join(ROOT, "src/cli")), ...sources(join(ROOT, "test"))].filter((f) => !f.endsWith("library.test.ts"));
  const text = users.map((f) => readFileSync(f, "utf8")).join("\n");
  const unused = names.filter((n) => !new RegExp(`\\b${n}\\b`).test(text));
  expect(unused).toEqual([]);
});

test("the values it exports load", () => {
  for (const v of [library.openImage, library.Server, library.PageServer, library.Logger, library.SnaploadError]) expect(typeof v).toBe("function");
});
