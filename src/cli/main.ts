// The `snapload` command line: finds the command, which parses and validates once (its table in
// src/cli/) and hands typed config to its implementation.
import { bindRun, type Command } from "./command.ts";
import { demo } from "./demo.ts";
import { inspect } from "./inspect.ts";
import { pageServer } from "./page-server.ts";
import { qemuRestore } from "./qemu-restore.ts";
import { qemuSave } from "./qemu-save.ts";
import { pullCmd, pushCmd } from "./push.ts";
import { serve } from "./serve.ts";
import { stats } from "./stats.ts";
import { ConfigError, SnaploadError } from "../core/errors.ts";

/**
 * Every command, in usage order. Adding one: a module in src/cli/ and a line here. An
 * implementation that imports its table's config type is bound here, not in the table.
 */
const COMMANDS: Command[] = [
  bindRun(serve, async (c) => (await import("./serve-command.ts")).serveCommand(c)),
  bindRun(pageServer, async (c) => (await import("./page-server-command.ts")).pageServerCommand(c)),
  stats,
  inspect,
  bindRun(qemuRestore, async (c) => (await import("./qemu-restore-command.ts")).qemuRestoreCommand(c)),
  bindRun(qemuSave, async (c) => (await import("./qemu-save-command.ts")).qemuSaveCommand(c)),
  pushCmd,
  pullCmd,
  bindRun(demo, async (c) => (await import("./demo-command.ts")).demoCommand(c)),
];

export const USAGE = `snapload — lazy snapshot loading over userfaultfd

usage:
${COMMANDS.map((c) => c.usage()).join("")}  snapload help [COMMAND]
`;

const HELP = ["help", "--help", "-h"];

export async function runCli(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  try {
    if (name === undefined || HELP.includes(name)) {
      const topic = name === "help" && rest[0] !== undefined ? find(rest[0]) : undefined;
      process.stdout.write(topic ? topic.usage() : USAGE);
      return name === undefined ? 2 : 0;
    }
    const command = find(name);
    if (rest.some((a) => a === "--help" || a === "-h")) {
      process.stdout.write(command.usage());
      return 0;
    }
    return await command.main(rest);
  } catch (e) {
    if (e instanceof SnaploadError) {
      process.stderr.write(`snapload: ${e.message}\n`);
      if (e instanceof ConfigError) process.stderr.write("run 'snapload help' for usage\n");
      return 2;
    }
    throw e;
  }
}

function find(name: string): Command {
  const c = COMMANDS.find((c) => c.name === name);
  if (!c) throw new ConfigError(`unknown command '${name}'`, { command: name });
  return c;
}
