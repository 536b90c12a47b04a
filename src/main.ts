#!/usr/bin/env bun
// Entry point of the `snapload` executable (and of the single binary).
import { runCli } from "./cli/main.ts";

process.exitCode = await runCli(process.argv.slice(2));
