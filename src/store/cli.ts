// Command line of the store commands: `push`, `pull`, and `inspect STORE/NAME`.
// Parsed with util.parseArgs, validated once with zod; typed config goes to push.ts.
import { parseArgs } from "node:util";
import { z } from "zod";
import { ConfigError } from "../errors.ts";
import { formatBytes } from "../log.ts";
import { CHUNK_SIZES } from "./format.ts";
import { formatInspect, formatPush, inspectStore, pull, push } from "./push.ts";


const int = (min: number, max: number) => z.string().regex(/^\d+$/, "must be a whole number").transform(Number).pipe(z.number().int().min(min).max(max));
const chunkSize = z
  .string()
  .transform((s, ctx) => {
    const m = s.toLowerCase().match(/^(\d+)([km]?)i?b?$/);
    const n = m ? Number(m[1]) * (m[2] === "k" ? 1024 : m[2] === "m" ? 1024 * 1024 : 1) : Number.NaN;
    if (!(CHUNK_SIZES as readonly number[]).includes(n)) {
      ctx.addIssue({ code: "custom", message: `must be one of ${CHUNK_SIZES.map((c) => formatBytes(c).replace(" ", "")).join(", ")}` });
      return z.NEVER;
    }
    return n;
  });
const endpoint = z.url({ message: "must be a URL such as http://127.0.0.1:8080" }).optional();

const pushSchema = z.object({
  "chunk-size": chunkSize.optional(),
  level: int(1, 19).optional(),
  parallel: int(1, 256).optional(),
  ramblock: z.string().min(1).optional(),
  "working-set": z.string().min(1).optional(),
  "s3-endpoint": endpoint,
});
const pullSchema = z.object({ parallel: int(1, 256).optional(), "s3-endpoint": endpoint });
const inspectSchema = z.object({ json: z.boolean().default(false), "s3-endpoint": endpoint });

function parse<S extends z.ZodType>(command: string, argv: string[], schema: S, options: Record<string, { type: "string" | "boolean" }>, positionals: number): { values: z.output<S>; args: string[] } {
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs({ args: argv, options, allowPositionals: true, strict: true });
  } catch (e) {
    throw new ConfigError(`${command}: ${(e as Error).message.replace(/\. To specify.*$/s, "")}`);
  }
  if (parsed.positionals.length !== positionals) throw new ConfigError(`${command} takes ${positionals} arguments, got ${parsed.positionals.length}`);
  const r = schema.safeParse(parsed.values);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new ConfigError(`${command}: --${issue.path.join(".")}: ${issue.message}`);
  }
  return { values: r.data, args: parsed.positionals };
}

const str = { type: "string" } as const;

export async function storeCommand(command: "push" | "pull" | "inspect", argv: string[]): Promise<number> {
  switch (command) {
    case "push": {
      const { values: v, args } = parse("push", argv, pushSchema, { "chunk-size": str, level: str, parallel: str, ramblock: str, "working-set": str, "s3-endpoint": str }, 2);
      const tty = process.stderr.isTTY;
      let last = 0;
      const report = await push(args[0]!, args[1]!, {
        chunkSize: v["chunk-size"],
        level: v.level,
        parallel: v.parallel,
        ramblock: v.ramblock,
        workingSet: v["working-set"],
        s3Endpoint: v["s3-endpoint"],
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
      process.stdout.write(`${formatPush(report, args[1]!)}\n`);
      return 0;
    }
    case "pull": {
      const { values: v, args } = parse("pull", argv, pullSchema, { parallel: str, "s3-endpoint": str }, 2);
      const r = await pull(args[0]!, args[1]!, { parallel: v.parallel, s3Endpoint: v["s3-endpoint"] });
      process.stdout.write(`pulled ${args[0]} to ${args[1]}: ${formatBytes(r.size)}, ${r.fetchedChunks} chunks, ${formatBytes(r.fetchedBytes)} fetched in ${r.seconds.toFixed(2)} s\n`);
      return 0;
    }
    case "inspect": {
      const { values: v, args } = parse("inspect", argv, inspectSchema, { json: { type: "boolean" }, "s3-endpoint": str }, 1);
      const r = await inspectStore(args[0]!, { s3Endpoint: v["s3-endpoint"] });
      process.stdout.write(`${v.json ? JSON.stringify(r, null, 2) : formatInspect(r)}\n`);
      return 0;
    }
  }
}
