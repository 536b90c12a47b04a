// Builds dist/snapload: one executable with the C core embedded (extracted to $TMPDIR at run time).
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const root = join(import.meta.dir, "..");
mkdirSync(join(root, "dist"), { recursive: true });
const r = Bun.spawnSync(
  // The push's hashing worker is its own entry point: a compiled binary finds a worker only so.
  [process.execPath, "build", "--compile", "--minify-syntax", join(root, "src/main.ts"), join(root, "src/sources/store/hash-worker.ts"), "--outfile", join(root, "dist/snapload")],
  { stdout: "inherit", stderr: "inherit", cwd: root },
);
process.exit(r.exitCode ?? 1);
