// The store commands' work once their options are parsed (src/cli/push.ts, pull.ts, inspect.ts
// hold the option tables): progress, reports, output.
import { z } from "zod";
import { formatBytes } from "../core/log.ts";
import { CHUNK_SIZES } from "../sources/store/format.ts";
import { formatInspect, formatPush, inspectStore, pull, push } from "../sources/store/push.ts";

/** `--chunk-size`: 256k|1m|2m|4m (any of the sizes the format allows). */
export const chunkSizeValue = () =>
  z
    .string()
    .transform((s, ctx) => {
      const m = s.toLowerCase().match(/^(\d+)([km]?)i?b?$/);
      const n = m ? Number(m[1]) * (m[2] === "k" ? 1024 : m[2] === "m" ? 1024 * 1024 : 1) : Number.NaN;
      if (!(CHUNK_SIZES as readonly number[]).includes(n)) {
        ctx.addIssue({ code: "custom", message: `must be one of ${CHUNK_SIZES.map((c) => formatBytes(c).replace(" ", "")).join(", ")}` });
        return z.NEVER;
      }
      return n;
    })
    .optional();

/** `--s3-endpoint`: an S3-compatible endpoint URL. */
export const endpointValue = () => z.url({ message: "must be a URL such as http://127.0.0.1:8080" }).optional();

export interface PushArgs {
  file: string;
  target: string;
  chunkSize?: number;
  level?: number;
  parallel?: number;
  ramblock?: string;
  wholeFile?: boolean;
  workingSet?: string;
  s3Endpoint?: string;
  partSize?: number;
}

export async function pushCommand(a: PushArgs): Promise<number> {
  const tty = process.stderr.isTTY;
  let last = 0;
  const report = await push(a.file, a.target, {
    chunkSize: a.chunkSize,
    level: a.level,
    parallel: a.parallel,
    ramblock: a.ramblock,
    wholeFile: a.wholeFile,
    workingSet: a.workingSet,
    s3Endpoint: a.s3Endpoint,
    partSize: a.partSize,
    progress: tty
      ? (done, total, up) => {
          const now = performance.now();
          if (now - last < 100 && done < total) return;
          last = now;
          const w = 30;
          const fill = Math.round((done / total) * w);
          process.stderr.write(`\r[${"#".repeat(fill)}${" ".repeat(w - fill)}] ${done}/${total} chunks, ${formatBytes(up)} uploaded `);
        }
      : undefined,
  });
  if (tty) process.stderr.write("\n");
  process.stdout.write(`${formatPush(report, a.target)}\n`);
  return 0;
}

export async function pullCommand(a: { source: string; file: string; parallel?: number; s3Endpoint?: string }): Promise<number> {
  const r = await pull(a.source, a.file, { parallel: a.parallel, s3Endpoint: a.s3Endpoint });
  process.stdout.write(`pulled ${a.source} to ${a.file}: ${formatBytes(r.size)}, ${r.fetchedChunks} chunks, ${formatBytes(r.fetchedBytes)} fetched in ${r.seconds.toFixed(2)} s\n`);
  return 0;
}

export async function inspectStoreCommand(a: { name: string; json: boolean; s3Endpoint?: string }): Promise<number> {
  const r = await inspectStore(a.name, { s3Endpoint: a.s3Endpoint });
  process.stdout.write(`${a.json ? JSON.stringify(r, null, 2) : formatInspect(r)}\n`);
  return 0;
}
