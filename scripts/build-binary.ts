// Builds dist/snapload: one executable with the C core embedded (extracted to $TMPDIR at run time).
// --bytecode: JavaScriptCore bytecode compiled at build time, so start-up skips parsing ~180
// modules (measured: bench q's start-up row); ESM keeps main.ts's top-level await.
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const root = join(import.meta.dir, "..");
mkdirSync(join(root, "dist"), { recursive: true });
const r = Bun.spawnSync(
  // The push's hashing worker is its own entry point: a compiled binary finds a worker only so.
  // --bytecode: start-up CPU halves (bench q's start-up row).
  [process.execPath, "build", "--compile", "--bytecode", "--format=esm", "--minify-syntax", join(root, "src/main.ts"), join(root, "src/sources/store/hash-worker.ts"), "--outfile", join(root, "dist/snapload")],
  { stdout: "inherit", stderr: "inherit", cwd: root },
);
process.exit(r.exitCode ?? 1);
