// Command-line configuration, validated once at the edge. Everything past here trusts its input.
import { z } from "zod";
import { ConfigError } from "./errors.ts";

const intFlag = (min: number, max: number) =>
  z
    .string()
    .regex(/^\d+$/, "must be a whole number")
    .transform(Number)
    .pipe(z.number().int().min(min).max(max));

const repeated = (name: string) =>
  z.preprocess((v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]), z.array(z.string().min(1)).min(1, `--${name} is required`));

/** Pages per fault unless told otherwise: the best of the fault-around sweep (README, bench f). */
export const DEFAULT_FAULT_AROUND = 16;

export const serveSchema = z
  .object({
  socket: repeated("socket"),
  mem: repeated("mem"),
  ramblock: z.string().optional(),
  "socket-mode": z
    .string()
    .regex(/^0?[0-7]{3}$/, "must be an octal mode such as 0600")
    .transform((s) => Number.parseInt(s, 8))
    .default(0o600),
  "fault-around": intFlag(1, 512).optional(),
  "spin-us": intFlag(0, 10_000).default(50),
  "handshake-timeout": intFlag(10, 600_000).default(5000),
  "on-fatal": z.enum(["kill", "drop"]).default("kill"),
  populate: z.enum(["none", "background"]).optional(),
  prefetch: z.string().min(1).optional(),
  record: z.string().min(1).optional(),
  "log-level": z.enum(["error", "warn", "info", "debug"]).default("info"),
  "page-server-deadline": intFlag(100, 86_400_000).default(30_000),
  "token-file": z.string().min(1).optional(),
  // object stores (src/store/)
  "cache-dir": z.string().min(1).optional(),
  "cache-size": z.string().regex(/^\d+[kmgt]?$/i, "must be bytes, or a number with k/m/g/t").transform((s) => Number.parseInt(s, 10) * 1024 ** " kmgt".indexOf((s.match(/[kmgt]$/i)?.[0] ?? " ").toLowerCase())).optional(),
  "s3-endpoint": z.url().optional(),
  "store-parallel": intFlag(1, 256).optional(),
})
  .refine((c) => c.mem.length === 1 || c.mem.length === c.socket.length, {
    message: "give one --mem for all sockets, or one --mem per --socket (paired in order)",
    path: ["mem"],
  });
export type ServeConfig = z.output<typeof serveSchema>;

export const pageServerSchema = z.object({
  listen: z.string({ error: (i) => (i.input === undefined ? "is required (HOST:PORT to listen on)" : "must be HOST:PORT") }).min(1),
  mem: z.string({ error: (i) => (i.input === undefined ? "is required (the image to serve)" : "must be a path") }).min(1),
  ramblock: z.string().optional(),
  "token-file": z.string({
    error: (i) => (i.input === undefined ? "is required: the page server serves only clients that prove they hold this shared secret" : "must be a path"),
  }).min(1),
  "handshake-timeout": intFlag(10, 600_000).default(5000),
  "log-level": z.enum(["error", "warn", "info", "debug"]).default("info"),
  // TEST ONLY (not in the usage text): flip a payload byte of every Nth reply to exercise client checksums.
  "test-only-corrupt-every": intFlag(1, 1_000_000_000).optional(),
});
export type PageServerConfig = z.output<typeof pageServerSchema>;

export const inspectSchema = z.object({
  file: z.string().min(1, "inspect needs a FILE"),
  ramblock: z.string().optional(),
  json: z.boolean().default(false),
});
export type InspectConfig = z.output<typeof inspectSchema>;

export const demoSchema = z.object({
  "size-mib": intFlag(4, 65536).default(256),
  threads: intFlag(1, 64).default(2),
  "fault-around": intFlag(1, 512).default(16),
  dir: z.string().optional(),
  keep: z.boolean().default(false),
});
export type DemoConfig = z.output<typeof demoSchema>;

/**
 * Splits `--flag value`, `--flag=value` and bare `--switch` (for the names in `switches`).
 * A flag given twice becomes an array (the schema decides whether that is allowed).
 */
export function parseFlags(argv: string[], switches: string[] = []): { flags: Record<string, string | string[] | boolean>; positional: string[] } {
  const flags: Record<string, string | string[] | boolean> = {};
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith("--")) {
      positional.push(a);
      continue;
    }
    const eq = a.indexOf("=");
    const name = eq > 0 ? a.slice(2, eq) : a.slice(2);
    if (switches.includes(name)) {
      flags[name] = true;
      continue;
    }
    const value = eq > 0 ? a.slice(eq + 1) : argv[++i];
    if (value === undefined) throw new ConfigError(`--${name} needs a value`);
    const prev = flags[name];
    flags[name] = prev === undefined ? value : Array.isArray(prev) ? [...prev, value] : [String(prev), value];
  }
  return { flags, positional };
}

export function validate<S extends z.ZodType>(schema: S, input: unknown, known: string[], repeatable: string[] = []): z.output<S> {
  if (input && typeof input === "object") {
    for (const [k, v] of Object.entries(input)) {
      if (!known.includes(k)) throw new ConfigError(`unknown option --${k}`);
      if (Array.isArray(v) && !repeatable.includes(k)) throw new ConfigError(`--${k} given more than once`);
    }
  }
  const r = schema.safeParse(input);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    const name = issue.path.join(".");
    throw new ConfigError(name ? `--${name}: ${issue.message}` : issue.message);
  }
  return r.data;
}
