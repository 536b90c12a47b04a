// The layout rules of src/ (docs/architecture.md): no import cycles; src/core/ (the bottom
// layer: errors, logging, FFI, the event loop) imports nothing from the other src/ directories;
// the source port imports nothing above it; the parts the daemon and the CLI are made of
// (scheduler/, sources/, sinks/, postcopy/) never import from daemon/ or cli/.
// Type-only imports count: a cycle of types is still two modules that cannot be read apart.
import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const SRC = resolve(import.meta.dir, "../src");

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...sourceFiles(p));
    else if (e.name.endsWith(".ts") && !e.name.endsWith(".d.ts")) out.push(p);
  }
  return out.sort();
}

/** Relative specifiers of `import ... from`, `export ... from` and `import("...")`, comments stripped. */
export function relativeImports(text: string): string[] {
  // Line comments first: a comment may mention a glob such as "src/*.ts", which is no block comment.
  const code = text.replace(/(^|[^:"'`\\])\/\/.*$/gm, "$1").replace(/\/\*[\s\S]*?\*\//g, "");
  const specs: string[] = [];
  const patterns = [/\b(?:import|export)\s[^;]*?\bfrom\s*["']([^"']+)["']/g, /\bimport\s*["']([^"']+)["']/g, /\bimport\s*\(\s*["']([^"']+)["']\s*\)/g];
  for (const re of patterns) for (const m of code.matchAll(re)) if (m[1]!.startsWith(".")) specs.push(m[1]!);
  return specs;
}

function graph(): Map<string, string[]> {
  const g = new Map<string, string[]>();
  for (const f of sourceFiles(SRC)) {
    // Only modules of src/ (an embedded asset such as build/libsnapload.so is not a layer).
    const deps = relativeImports(readFileSync(f, "utf8"))
      .map((s) => relative(SRC, resolve(dirname(f), s)))
      .filter((d) => !d.startsWith("..") && d.endsWith(".ts"));
    g.set(relative(SRC, f), [...new Set(deps)]);
  }
  return g;
}

/** Every cycle's members (strongly connected components of more than one file, or a self-import), as a path. */
export function cycles(g: Map<string, string[]>): string[][] {
  let index = 0;
  const idx = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const on = new Set<string>();
  const found: string[][] = [];
  const visit = (v: string) => {
    idx.set(v, index);
    low.set(v, index++);
    stack.push(v);
    on.add(v);
    for (const w of g.get(v) ?? []) {
      if (!g.has(w)) continue;
      if (!idx.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (on.has(w)) low.set(v, Math.min(low.get(v)!, idx.get(w)!));
    }
    if (low.get(v) === idx.get(v)) {
      const scc: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        on.delete(w);
        scc.push(w);
      } while (w !== v);
      if (scc.length > 1 || (g.get(v) ?? []).includes(v)) found.push(pathThrough(g, new Set(scc), v));
    }
  };
  for (const v of g.keys()) if (!idx.has(v)) visit(v);
  return found;
}

/** One concrete cycle inside a strongly connected component, from v back to v (what to print). */
function pathThrough(g: Map<string, string[]>, scc: Set<string>, v: string): string[] {
  const prev = new Map<string, string>();
  const queue = [v];
  const seen = new Set([v]);
  while (queue.length) {
    const u = queue.shift()!;
    for (const w of g.get(u) ?? []) {
      if (!scc.has(w)) continue;
      if (w === v) {
        const path = [u];
        while (path[0] !== v) path.unshift(prev.get(path[0]!)!);
        return [...path, v];
      }
      if (!seen.has(w)) {
        seen.add(w);
        prev.set(w, u);
        queue.push(w);
      }
    }
  }
  return [v, v];
}

describe("src/ layout", () => {
  const g = graph();

  test("the import graph has no cycle (type-only imports included)", () => {
    const found = cycles(g).map((c) => c.join(" -> "));
    expect(found, `import cycles:\n  ${found.join("\n  ")}`).toEqual([]);
  });

  test("src/core/ imports nothing from the other src/ directories", () => {
    const upward: string[] = [];
    for (const [file, deps] of g) {
      if (!file.startsWith("core/")) continue;
      for (const d of deps) if (!d.startsWith("core/")) upward.push(`${file} -> ${d}`);
    }
    expect(upward, `src/core/ imports upward:\n  ${upward.join("\n  ")}`).toEqual([]);
  });

  test("the source port (sources/port.ts) imports only from below it: core/ and the image's types", () => {
    const deps = g.get("sources/port.ts")!;
    expect(deps.length).toBeGreaterThan(0);
    const upward = deps.filter((d) => !d.startsWith("core/") && !d.startsWith("sources/image/"));
    expect(upward, `sources/port.ts imports upward: ${upward.join(", ")}`).toEqual([]);
  });

  test("scheduler/, sources/, sinks/ and postcopy/ never import from daemon/ or cli/", () => {
    const parts = ["scheduler/", "sources/", "sinks/", "postcopy/"];
    let checked = 0;
    const upward: string[] = [];
    for (const [file, deps] of g) {
      if (!parts.some((p) => file.startsWith(p))) continue;
      checked++;
      for (const d of deps) if (d.startsWith("daemon/") || d.startsWith("cli/")) upward.push(`${file} -> ${d}`);
    }
    // The directories exist and hold modules (a renamed directory would make this rule vacuous).
    for (const p of parts) expect([...g.keys()].some((f) => f.startsWith(p)), `no module under src/${p}`).toBe(true);
    expect(checked).toBeGreaterThan(4);
    expect(upward, `imports from daemon/ or cli/:\n  ${upward.join("\n  ")}`).toEqual([]);
  });

  test("the checker sees the import forms the code uses, and finds a cycle it is given", () => {
    const text = `// a comment on src/*.ts\nimport { a } from "./a.ts";\nimport type { B } from "../b.ts";\nexport { c } from "./c.ts";\n// import { d } from "./d.ts";\nconst e = await import("./e.ts");\nimport "./f.ts";`;
    expect(relativeImports(text).sort()).toEqual(["../b.ts", "./a.ts", "./c.ts", "./e.ts", "./f.ts"]);
    const g2 = new Map([["a", ["b"]], ["b", ["c"]], ["c", ["a"]], ["d", ["a"]]]);
    expect(cycles(g2)).toEqual([["a", "b", "c", "a"]]);
    expect(cycles(new Map([["a", ["b"]], ["b", []]]))).toEqual([]);
  });
});
