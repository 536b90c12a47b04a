// The `snapload` command line: parses, validates once, and hands typed config to a command.
import { ConfigError, SnaploadError } from "./errors.ts";
import { STORE_USAGE } from "./store/usage.ts";
import { demoSchema, inspectSchema, pageServerSchema, parseFlags, serveSchema, validate } from "./config.ts";

export const USAGE = `snapload — lazy snapshot loading over userfaultfd

usage:
  snapload serve --socket PATH --mem FILE [options]
      Serve Firecracker-style VMMs that connect to PATH, from a raw memory file or a
      QEMU mapped-ram file (detected from its QEVM header). Repeat --socket (and --mem)
      to serve several images from one daemon: sockets and images pair up in order.
      --ramblock NAME         mapped-ram block to serve (default: the largest, the guest RAM)
      --socket-mode MODE      socket file mode (default 0600)
      --fault-around N        4 KiB pages installed per fault, aligned window (default 16, or 1
                              with --record; 1 = one page per fault, Firecracker's on_demand;
                              on 2 MiB pages the window is N x 4 KiB, at least one page)
      --spin-us N             busy-poll N µs for the next fault before sleeping (default 50): a
                              guest on another CPU is served without a cross-CPU wake-up; 0 = never
      --handshake-timeout MS  drop peers that have not sent their handshake by then (default 5000)
      --on-fatal kill|drop    a VM that can no longer be served is killed (SIGKILL) or dropped (default kill)
      --prefetch FILE         install this recorded working set as soon as a VM connects (faults first)
      --populate MODE         none: pure on demand; background: install every page left, then
                              unregister the VM (detach) (default none; background for tcp://)
      --record FILE           write each VM's first-touch order when it exits and on SIGUSR1;
                              {vm} and {pid} in FILE are replaced (else the last writer wins)
      --log-level LEVEL       error|warn|info|debug (default info)
      --mem tcp://HOST:PORT   fetch pages from a page server instead (postcopy; see page-server);
                              every page not touched yet is pulled in the background, then the VM
                              is detached
      --token-file FILE       the page server's shared secret (required with tcp://)
      --page-server-deadline MS  a VM whose page server stays unreachable this long is killed
                              (default 30000); also the deadline for a chunk from a store
      --mem STORE/NAME        a snapshot in a store (file://DIR, s3://BUCKET[/PREFIX], http(s)://URL;
                              see push): chunks fetched on demand, verified, kept in the host cache;
                              the snapshot's recorded working set is prefetched first
      --cache-dir DIR         host chunk cache, shared by every daemon (default /var/cache/snapload
                              as root, else $TMPDIR/snapload)
      --cache-size N          cache size in bytes, or with k/m/g/t (default 10g); LRU eviction
      --s3-endpoint URL       S3-compatible endpoint for s3:// (Ceph RGW, MinIO, ...), path-style
      --store-parallel N      chunk GETs in flight per daemon (default 8)
  snapload page-server --listen HOST:PORT --mem FILE --token-file FILE [options]
      Serve an image's pages over TCP to daemons started with --mem tcp://HOST:PORT (postcopy).
      Clients must prove they hold the same --token-file secret. The channel is NOT encrypted:
      use it on a trusted network or inside a tunnel.
      --ramblock NAME         mapped-ram block to serve (as for serve)
      --handshake-timeout MS  drop clients that have not authenticated by then (default 5000)
      --log-level LEVEL       error|warn|info|debug (default info)
  snapload inspect FILE [--ramblock NAME] [--json]
      Show an image's format, blocks, page size, and data vs zero pages.
${STORE_USAGE}  snapload demo [--size-mib N] [--threads N] [--fault-around N] [--dir DIR] [--keep]
      Make a demo image, serve it, restore a stand-in VM from it and verify every page.
  snapload help
`;

const SERVE_FLAGS = [
  "socket", "mem", "ramblock", "socket-mode", "fault-around", "handshake-timeout", "on-fatal", "populate",
  "prefetch", "record", "log-level", "page-server-deadline", "token-file", "spin-us",
  "cache-dir", "cache-size", "s3-endpoint", "store-parallel",
];

export async function runCli(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case "serve": {
        const { flags } = parseFlags(rest);
        const config = validate(serveSchema, flags, SERVE_FLAGS, ["socket", "mem"]);
        const { serveCommand } = await import("./serve-command.ts");
        return await serveCommand(config);
      }
      case "page-server": {
        const { flags } = parseFlags(rest);
        const config = validate(pageServerSchema, flags, Object.keys(pageServerSchema.shape));
        const { pageServerCommand } = await import("./page-server-command.ts");
        return await pageServerCommand(config);
      }
      case "push":
      case "pull":
        return await (await import("./store/cli.ts")).storeCommand(command, rest);
      case "inspect": {
        if (rest[0] !== undefined && (await import("./store/stores.ts")).isStoreUrl(rest[0])) return await (await import("./store/cli.ts")).storeCommand("inspect", rest);
        const { flags, positional } = parseFlags(rest, ["json"]);
        if (positional.length > 1) throw new ConfigError(`inspect takes one FILE, got ${positional.length}`);
        const config = validate(inspectSchema, { ...flags, file: positional[0] ?? "" }, Object.keys(inspectSchema.shape));
        const { inspectImage } = await import("./inspect.ts");
        process.stdout.write(`${inspectImage(config.file, { ramblock: config.ramblock, json: config.json })}\n`);
        return 0;
      }
      case "demo": {
        const { flags } = parseFlags(rest, ["keep"]);
        const config = validate(demoSchema, flags, Object.keys(demoSchema.shape));
        const { demoCommand } = await import("./demo.ts");
        return await demoCommand(config);
      }
      case undefined:
      case "help":
      case "--help":
      case "-h":
        process.stdout.write(USAGE);
        return command === undefined ? 2 : 0;
      default:
        throw new ConfigError(`unknown command '${command}'`);
    }
  } catch (e) {
    if (e instanceof SnaploadError) {
      process.stderr.write(`snapload: ${e.message}\n`);
      if (e instanceof ConfigError) process.stderr.write("run 'snapload help' for usage\n");
      return 2;
    }
    throw e;
  }
}
