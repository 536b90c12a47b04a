// One table per command: each option's row gives util.parseArgs its type, zod its schema and the
// usage text its line, so the three cannot drift apart. A command is a `defineCommand` call in a
// module of its own plus one line in the registry (src/cli/main.ts).
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { z } from "zod";
import { ConfigError } from "../core/errors.ts";

export interface Option<S extends z.ZodType = z.ZodType> {
  /** `string` takes a value (`--name VALUE` or `--name=VALUE`); `boolean` is a switch. */
  type: "string" | "boolean";
  /** The flag may be repeated; its value is then an array (in order). */
  multiple?: boolean;
  /** Filled from the command's positional arguments (in table order) instead of a flag. */
  positional?: boolean;
  /** Validates (and converts) what the parser produced: string, string[], boolean or undefined. */
  schema: S;
  /** Placeholder in the usage text, e.g. `N` for `--spin-us N`. */
  arg?: string;
  /** Usage text; `\n` starts a new line in the help column. */
  help: string;
}

type Options = Record<string, Option>;
type Shape<O extends Options> = { [K in keyof O]: O[K]["schema"] };
export type ConfigOf<O extends Options> = z.output<z.ZodObject<Shape<O>>>;

/** A rule across options, checked after each option is valid; `option` names the flag to blame. */
export interface Check<C> {
  ok: (config: C) => boolean;
  option: string;
  message: string;
}

export interface CommandSpec<O extends Options> {
  name: string;
  /** What follows `snapload NAME` in the usage, e.g. `--socket PATH --mem FILE [options]`. */
  synopsis: string;
  /** A few lines describing the command. */
  summary: string;
  options: O;
  checks?: Check<ConfigOf<O>>[];
  /**
   * The implementation (a dynamic import, so `help` loads nothing else). Left out when the
   * implementation imports this table's config type: main.ts binds it (`bindRun`), so the table
   * does not import its implementation back (no import cycle).
   */
  run?: (config: ConfigOf<O>) => Promise<number>;
}

export interface Command<C = unknown> {
  readonly name: string;
  readonly schema: z.ZodType<C>;
  readonly options: Readonly<Record<string, Option>>;
  /** argv after the command name → validated config; throws ConfigError. */
  parse(argv: string[]): C;
  usage(): string;
  main(argv: string[]): Promise<number>;
}

export function defineCommand<const O extends Options>(spec: CommandSpec<O>): Command<ConfigOf<O>> {
  const shape = Object.fromEntries(Object.entries(spec.options).map(([k, o]) => [k, o.schema])) as Shape<O>;
  let schema: z.ZodType<ConfigOf<O>> = z.object(shape) as unknown as z.ZodType<ConfigOf<O>>;
  if (spec.checks?.length) {
    const checks = spec.checks;
    schema = schema.superRefine((c, ctx) => {
      for (const ch of checks) if (!ch.ok(c)) ctx.addIssue({ code: "custom", message: ch.message, path: [ch.option] });
    });
  }
  const parserOptions: ParseArgsOptionsConfig = {};
  const positionals: string[] = [];
  for (const [name, o] of Object.entries(spec.options)) {
    if (o.positional) positionals.push(name);
    else parserOptions[name] = { type: o.type, multiple: o.multiple ?? false };
  }
  const command: Command<ConfigOf<O>> = {
    name: spec.name,
    schema,
    options: spec.options,
    parse(argv) {
      const raw = parseFlags(spec.name, argv, parserOptions);
      if (raw.positionals.length > positionals.length) {
        throw new ConfigError(
          positionals.length === 0
            ? `${spec.name} takes no arguments, got '${raw.positionals[0]}'`
            : `${spec.name} takes ${positionals.length === 1 ? "one " : ""}${positionals.map((p) => spec.options[p]!.arg ?? p).join(" ")}, got ${raw.positionals.length} arguments`,
          { command: spec.name, positionals: raw.positionals },
        );
      }
      const input: Record<string, unknown> = { ...raw.values };
      positionals.forEach((p, i) => (input[p] = raw.positionals[i]));
      const r = schema.safeParse(input);
      if (!r.success) {
        const issue = r.error.issues[0]!;
        const name = String(issue.path[0] ?? "");
        const label = spec.options[name]?.positional ? (spec.options[name]!.arg ?? name) : `--${name}`;
        throw new ConfigError(name ? `${label}: ${issue.message}` : issue.message, { command: spec.name, option: name });
      }
      return r.data;
    },
    usage: () => usageOf(spec),
    main: async (argv) => {
      if (spec.run === undefined) throw new Error(`internal: no implementation bound to '${spec.name}'`);
      return spec.run(command.parse(argv));
    },
  };
  return command;
}

/** The command with its implementation: what main.ts lists for a table defined without `run`. */
export function bindRun<C>(command: Command<C>, run: (config: C) => Promise<number>): Command<C> {
  return { ...command, main: async (argv) => run(command.parse(argv)) };
}

/**
 * util.parseArgs in strict mode, with its errors reworded to name the flag. Booleans also take
 * `--name=true|false` and `--no-name`; a value that starts with `-` must be attached (`--x=-y`), so
 * a forgotten value never swallows the next flag.
 */
function parseFlags(command: string, argv: string[], options: ParseArgsOptionsConfig) {
  const args: string[] = [];
  for (const a of argv) {
    const m = /^--([^=]+)=(.*)$/s.exec(a);
    if (m && options[m[1]!]?.type === "boolean") {
      if (m[2] === "true") args.push(`--${m[1]}`);
      else if (m[2] === "false") args.push(`--no-${m[1]}`);
      else throw new ConfigError(`--${m[1]} is a switch: give it alone, or as --${m[1]}=true|false`, { command, option: m[1] });
    } else args.push(a);
  }
  let parsed;
  try {
    parsed = parseArgs({ args, options, strict: true, allowPositionals: true, allowNegative: true, tokens: true });
  } catch (e) {
    throw diagnose(command, args, options, e);
  }
  const seen = new Set<string>();
  for (const t of parsed.tokens) {
    if (t.kind !== "option") continue;
    if (seen.has(t.name) && !options[t.name]!.multiple) throw new ConfigError(`--${t.name} given more than once`, { command, option: t.name });
    seen.add(t.name);
  }
  return { values: parsed.values as Record<string, string | string[] | boolean | undefined>, positionals: parsed.positionals };
}

/** Re-reads the arguments leniently to name the flag that strict parsing refused. */
function diagnose(command: string, args: string[], options: ParseArgsOptionsConfig, cause: unknown): ConfigError {
  const { tokens } = parseArgs({ args, options, strict: false, allowPositionals: true, allowNegative: true, tokens: true });
  for (const t of tokens) {
    if (t.kind !== "option") continue;
    const o = options[t.name] ?? (t.name.startsWith("no-") && options[t.name.slice(3)]?.type === "boolean" ? options[t.name.slice(3)] : undefined);
    const context = { command, option: t.name };
    if (!o) return new ConfigError(`unknown option ${t.rawName}`, context, { cause });
    if (o.type !== "string") continue;
    if (t.value === undefined) return new ConfigError(`--${t.name} needs a value`, context, { cause });
    if (!t.inlineValue && t.value.startsWith("-")) {
      return new ConfigError(`--${t.name} needs a value (got '${t.value}', which reads as a flag; write --${t.name}=${t.value} if it is the value)`, context, { cause });
    }
  }
  return new ConfigError(cause instanceof Error ? cause.message : String(cause), { command }, { cause });
}

const HELP_COLUMN = 24;

export function usageOf<O extends Options>(spec: CommandSpec<O>): string {
  const lines = [`  snapload ${spec.name}${spec.synopsis ? ` ${spec.synopsis}` : ""}`];
  for (const l of spec.summary.split("\n")) lines.push(`      ${l}`);
  for (const [name, o] of Object.entries(spec.options)) {
    if (o.positional) continue;
    const flag = `--${name}${o.arg ? ` ${o.arg}` : ""}`;
    const [first = "", ...rest] = o.help.split("\n");
    lines.push(flag.length < HELP_COLUMN ? `      ${flag.padEnd(HELP_COLUMN)}${first}` : `      ${flag}  ${first}`);
    for (const l of rest) lines.push(`      ${" ".repeat(HELP_COLUMN)}${l}`);
  }
  return `${lines.join("\n")}\n`;
}

// Value schemas shared by the tables. parseArgs hands over strings; these convert and bound them.

/** A whole number in [min, max], written in decimal. */
export const intValue = (min: number, max: number) =>
  z
    .string()
    .regex(/^\d+$/, "must be a whole number")
    .transform(Number)
    .pipe(z.number().int().min(min).max(max));

/** A required string; `what` says what is expected when it is missing. */
export const requiredString = (what: string) =>
  z.string({ error: (i) => (i.input === undefined ? `is required (${what})` : "must be a string") }).min(1, "must not be empty");

export const optionalString = () => z.string().min(1, "must not be empty").optional();

/** A repeatable flag that must be given at least once. */
export const repeatedString = (what: string) =>
  z.preprocess((v) => v ?? [], z.array(z.string().min(1, "must not be empty")).min(1, `is required (${what})`));

export const switchValue = () => z.boolean().default(false);

/** A size in bytes, or a whole number with a binary unit k/m/g/t (1k = 1024). */
export const byteSize = () =>
  z
    .string()
    .regex(/^\d+[kmgt]?$/i, "must be bytes, or a number with k/m/g/t")
    .transform((s) => Number.parseInt(s, 10) * 1024 ** " kmgt".indexOf((s.match(/[kmgt]$/i)?.[0] ?? " ").toLowerCase()));

export const logLevelValue = () => z.enum(["error", "warn", "info", "debug"]).default("info");

export const logLevelOption = {
  type: "string",
  schema: logLevelValue(),
  arg: "LEVEL",
  help: "error|warn|info|debug (default info)",
} as const satisfies Option;

export const logFormatOption = {
  type: "string",
  schema: z.enum(["text", "json"]).default("text"),
  arg: "FORMAT",
  help: "text: lines for people (default); json: one JSON event per line\n(docs/events.md)",
} as const satisfies Option;

export const metricsOption = {
  type: "string",
  schema: optionalString(),
  arg: "HOST:PORT",
  help: "serve Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md)",
} as const satisfies Option;
