#!/usr/bin/env bun
// Entry point of the `snapload` executable (and of the single binary).
import { SnaploadError } from "./core/errors.ts";

try {
  // Imported here, not above: loading the commands loads the C core, which can fail (a missing or
  // mismatched libsnapload.so), and that failure deserves the same one line as any other.
  const { runCli } = await import("./cli/main.ts");
  process.exitCode = await runCli(process.argv.slice(2));
} catch (e) {
  if (!(e instanceof SnaploadError)) throw e;
  process.stderr.write(`snapload: ${e.message}\n`);
  process.exitCode = 2;
}
