// Every log line is an event: a stable name (EventName), fields, and a sentence for people.
// `--log-format text` (default) prints the sentence; `json` prints one JSON object per line with
// the name and the fields, for machines. Names and fields are an interface (docs/events.md):
// rename neither; add new ones instead.
export type LogLevel = "error" | "warn" | "info" | "debug";
export type LogFormat = "text" | "json";
const ORDER: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };

/** Every event the daemons emit; docs/events.md gives each one's level and fields. */
export const EVENT_NAMES = [
  // serve
  "daemon.listening",
  "daemon.warm_up",
  "daemon.postcopy_warm_up",
  "daemon.signal",
  "daemon.shutdown_with_vms",
  "daemon.accept_failed",
  "daemon.socket_left",
  "metrics.listening",
  "peer.rejected",
  "vm.connected",
  "vm.detached",
  "vm.recorded",
  "vm.record_failed",
  "vm.setup_failed",
  "vm.failed",
  "vm.exited",
  // serve, postcopy client (--mem tcp://)
  "remote.retrying",
  "remote.ready",
  "remote.tampered",
  "remote.lost",
  "remote.channel_lost",
  "remote.back",
  "remote.delivering",
  "remote.done",
  // serve --mem STORE/NAME (src/store/)
  "store.manifest",
  "store.cache_warm",
  "store.cache_unreadable",
  "store.cache_corrupt",
  "store.cache_write_failed",
  "store.get_retrying",
  "store.bad_chunk",
  "store.working_set_fetched",
  "store.closed",
  // page-server
  "page_server.warm_up",
  "page_server.listening",
  "page_server.accept_failed",
  "page_server.client_connected",
  "page_server.client_authenticated",
  "page_server.request_refused",
  "page_server.client_refused",
  "page_server.client_closed",
  "page_server.defer_accept_refused",
  "page_server.bytes_unavailable",
  "page_server.closed",
  // qemu-restore
  "qemu.step",
  "qemu.restoring",
  "qemu.extra_blocks",
  "qemu.running",
  "qemu.progress",
  "qemu.recorded",
  "qemu.interrupted",
  "qemu.return_path_ignored",
  "qemu.source",
  // any daemon: lines a peer can cause at will are rate-limited; this says how many were not printed
  "log.suppressed",
  // configuration advice
  "config.token_file_mode",
] as const;
export type EventName = (typeof EVENT_NAMES)[number];

export type FieldValue = string | number | boolean | null | undefined | readonly (string | number)[];
export type Fields = Record<string, FieldValue>;

export interface LogRecord {
  ts: string;
  level: LogLevel;
  event: EventName;
  msg: string;
  [field: string]: FieldValue;
}

export interface LoggerOptions {
  format?: LogFormat;
  sink?: (line: string) => void;
}

export class Logger {
  readonly format: LogFormat;
  private readonly sink: (line: string) => void;

  constructor(
    private readonly level: LogLevel = "info",
    opts: LoggerOptions = {},
  ) {
    this.format = opts.format ?? "text";
    this.sink = opts.sink ?? ((l) => process.stderr.write(`${l}\n`));
  }

  enabled(level: LogLevel): boolean {
    return ORDER[level] <= ORDER[this.level];
  }

  log(level: LogLevel, event: EventName, message: string, fields: Fields = {}): void {
    if (!this.enabled(level)) return;
    const ts = new Date().toISOString();
    if (this.format === "json") {
      // The envelope first for people reading the line; fields can never overwrite it.
      const record: Record<string, unknown> = { ts, level, event, ...fields, msg: message };
      Object.assign(record, { ts, level, event, msg: message });
      this.sink(JSON.stringify(record));
    } else {
      this.sink(`snapload ${ts} ${level}: ${message}`);
    }
  }
  error(event: EventName, message: string, fields?: Fields): void { this.log("error", event, message, fields); }
  warn(event: EventName, message: string, fields?: Fields): void { this.log("warn", event, message, fields); }
  info(event: EventName, message: string, fields?: Fields): void { this.log("info", event, message, fields); }
  debug(event: EventName, message: string, fields?: Fields): void { this.log("debug", event, message, fields); }
}

/** An error's context as event fields: its plain values (strings, numbers, booleans, lists of them). */
export function contextFields(context: Record<string, unknown>): Fields {
  const out: Fields = {};
  for (const [k, v] of Object.entries(context)) {
    const plain = (x: unknown) => typeof x === "string" || typeof x === "number" || typeof x === "boolean";
    if (plain(v) || v === null || (Array.isArray(v) && v.every((x) => typeof x === "string" || typeof x === "number"))) out[k] = v as FieldValue;
  }
  return out;
}

export const silentLogger = new Logger("error", { sink: () => {} });

export function formatBytes(n: number): string {
  if (n >= 1 << 30 && n % (1 << 30) === 0) return `${n / (1 << 30)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(n % (1 << 20) === 0 ? 0 : 1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(n % (1 << 10) === 0 ? 0 : 1)} KiB`;
  return `${n} B`;
}
