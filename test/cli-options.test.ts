// The option tables (src/cli/*.ts) and util.parseArgs: the three bugs of the hand-written parser
// (dropped positionals, `--json=false` read as true, a value starting with `--` swallowed), checked
// on the parser in-process and on the real command line.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { USAGE } from "../src/cli/main.ts";
import { demo } from "../src/cli/demo.ts";
import { inspect } from "../src/cli/inspect.ts";
import { pullCmd, pushCmd } from "../src/cli/push.ts";
import { pageServer } from "../src/cli/page-server.ts";
import { serve } from "../src/cli/serve.ts";
import { stats } from "../src/cli/stats.ts";
import { ConfigError } from "../src/core/errors.ts";
import { generateRawImage } from "./gen-mapped-ram.ts";
import { runSnapload, tempDir } from "./harness.ts";

/** The ConfigError message parse throws (fails the test if it does not throw one). */
function refusal(run: () => unknown): string {
  try {
    run();
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return (e as ConfigError).message;
  }
  throw new Error("parse accepted the arguments");
}

describe("parser", () => {
  test("a stray positional is refused, not dropped", () => {
    expect(refusal(() => serve.parse(["--socket", "s", "--mem", "m", "stray"]))).toBe("serve takes no arguments, got 'stray'");
    expect(refusal(() => inspect.parse(["a.mem", "b.mem"]))).toBe("inspect takes one FILE|STORE/NAME, got 2 arguments");
    expect(inspect.parse(["a.mem"]).file).toBe("a.mem");
  });

  test("--json=false is false, --json=true and --json are true, anything else is refused", () => {
    expect(inspect.parse(["f", "--json=false"]).json).toBe(false);
    expect(inspect.parse(["f", "--json=true"]).json).toBe(true);
    expect(inspect.parse(["f", "--json"]).json).toBe(true);
    expect(inspect.parse(["f", "--no-json"]).json).toBe(false);
    expect(inspect.parse(["f"]).json).toBe(false);
    expect(refusal(() => inspect.parse(["f", "--json=yes"]))).toContain("--json is a switch");
    expect(demo.parse(["--keep=false"]).keep).toBe(false);
  });

  test("a flag's missing value does not swallow the next flag", () => {
    expect(refusal(() => serve.parse(["--mem", "m", "--socket", "--fault-around", "4"]))).toStartWith("--socket needs a value");
    expect(refusal(() => serve.parse(["--socket", "s", "--mem", "-x"]))).toStartWith("--mem needs a value");
    // Attached, a value may start with a dash.
    expect(serve.parse(["--socket=--odd", "--mem", "m"]).socket).toEqual(["--odd"]);
  });

  test("page-server has no test-only switches: fault injection is a test seam (test/fixtures/faulty-page-server.ts)", () => {
    const base = ["--listen", "127.0.0.1:0", "--mem", "m", "--token-file", "t"];
    expect(pageServer.parse(base).mem).toBe("m");
    for (const flag of ["--test-only-corrupt-every", "--test-only-fail-accept-every"]) {
      expect(refusal(() => pageServer.parse([...base, flag, "2"]))).toBe(`unknown option ${flag}`);
    }
    expect(Object.keys(pageServer.options).filter((k) => k.startsWith("test"))).toEqual([]);
  });

  test("unknown, repeated and invalid options name the flag", () => {
    expect(refusal(() => serve.parse(["--socket", "s", "--mem", "m", "--nope", "1"]))).toBe("unknown option --nope");
    // The parser's own error stays attached as the cause.
    let caught: unknown;
    try {
      serve.parse(["--nope"]);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(ConfigError);
    expect(((caught as Error).cause as { code?: string }).code).toBe("ERR_PARSE_ARGS_UNKNOWN_OPTION");
    expect(refusal(() => pageServer.parse(["--listen", "h:1", "--mem", "a", "--mem", "b", "--token-file", "t"]))).toBe("--mem given more than once");
    expect(refusal(() => serve.parse(["--socket", "s", "--mem", "m", "--spin-us", "x"]))).toBe("--spin-us: must be a whole number");
    expect(refusal(() => serve.parse(["--socket", "s", "--mem", "m", "--on-fatal", "maybe"]))).toStartWith("--on-fatal: ");
    expect(refusal(() => serve.parse(["--socket", "a", "--socket", "b", "--socket", "c", "--mem", "x", "--mem", "y"]))).toStartWith("--mem: give one --mem");
    expect(refusal(() => pageServer.parse(["--listen", "h:1", "--mem", "a"]))).toStartWith("--token-file: is required");
    expect(refusal(() => stats.parse([]))).toStartWith("--metrics: is required");
    expect(refusal(() => stats.parse(["--metrics", "localhost"]))).toStartWith("--metrics: must be HOST:PORT");
    expect(stats.parse(["--metrics", "[::1]:9464"]).metrics).toBe("[::1]:9464");
  });

  test("defaults and conversions come from the table", () => {
    const c = serve.parse(["--socket", "a", "--socket", "b", "--mem", "m", "--socket-mode", "0660", "--fault-around", "64"]);
    expect(c).toMatchObject({ socket: ["a", "b"], mem: ["m"], "socket-mode": 0o660, "fault-around": 64, "spin-us": 50, "on-fatal": "kill", "log-level": "info" });
    expect(c.populate).toBeUndefined();
  });

  test("each command's usage lists every option of its table", () => {
    for (const command of [serve, pageServer, stats, inspect, pushCmd, pullCmd, demo]) {
      const usage = command.usage();
      expect(USAGE).toContain(usage);
      for (const [name, o] of Object.entries(command.options)) {
        if (o.positional) expect(usage).toContain(` ${o.arg} `);
        else expect(usage).toContain(`      --${name}${o.arg ? ` ${o.arg}` : ""} `);
      }
    }
  });
});

describe("command line", () => {
  let dir: ReturnType<typeof tempDir>;
  let raw: string;
  beforeAll(() => {
    dir = tempDir("snapload-cli-options-");
    raw = join(dir.path, "vm.mem");
    generateRawImage(raw, 1024 * 1024, 2);
  });
  afterAll(() => dir?.cleanup());

  test("inspect --json=false prints text", async () => {
    const r = await runSnapload(["inspect", raw, "--json=false"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^format:\s+raw$/m);
  });

  test("serve with a stray argument: exit 2, no socket", async () => {
    const sock = join(dir.path, "stray.sock");
    const r = await runSnapload(["serve", "--socket", sock, "--mem", raw, "stray"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("serve takes no arguments, got 'stray'");
    expect(existsSync(sock)).toBe(false);
  });

  test("serve --socket --fault-around 4: exit 2, no socket file named after the flag", async () => {
    const r = await runSnapload(["serve", "--mem", raw, "--socket", "--fault-around", "4"], { cwd: dir.path });
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--socket needs a value");
    expect(readdirSync(dir.path)).toEqual(["vm.mem"]);
  });

  test("page-server --test-only-corrupt-every: exit 2, unknown option", async () => {
    const r = await runSnapload(["page-server", "--listen", "127.0.0.1:0", "--mem", raw, "--token-file", raw, "--test-only-corrupt-every", "2"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown option --test-only-corrupt-every");
  });

  test("serve --help: that command's usage, exit 0", async () => {
    const r = await runSnapload(["serve", "--help"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("snapload serve");
    expect(r.stdout).not.toContain("snapload inspect");
  });
});
