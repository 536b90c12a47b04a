// Copies the latest benchmark table (bench/results.md) into README.md between the bench markers.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const root = join(import.meta.dir, "..");
const readme = join(root, "README.md");
const table = readFileSync(join(root, "bench/results.md"), "utf8").trim();
const text = readFileSync(readme, "utf8");
const start = "<!-- bench:start -->";
const end = "<!-- bench:end -->";
const a = text.indexOf(start);
const b = text.indexOf(end);
if (a < 0 || b < a) throw new Error("README.md has no bench markers");
writeFileSync(readme, `${text.slice(0, a + start.length)}\n${table.replace(/^### .*\n/, "")}\n${text.slice(b)}`);
