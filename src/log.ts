// One line per event on stderr. Plain text for people; the fields are stable for grep.
export type LogLevel = "error" | "warn" | "info" | "debug";
const ORDER: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };

export class Logger {
  constructor(
    private readonly level: LogLevel = "info",
    private readonly sink: (line: string) => void = (l) => process.stderr.write(`${l}\n`),
  ) {}

  enabled(level: LogLevel): boolean {
    return ORDER[level] <= ORDER[this.level];
  }

  log(level: LogLevel, message: string): void {
    if (ORDER[level] > ORDER[this.level]) return;
    this.sink(`snapload ${new Date().toISOString()} ${level}: ${message}`);
  }
  error(m: string): void { this.log("error", m); }
  warn(m: string): void { this.log("warn", m); }
  info(m: string): void { this.log("info", m); }
  debug(m: string): void { this.log("debug", m); }
}

export const silentLogger = new Logger("error", () => {});

export function formatBytes(n: number): string {
  if (n >= 1 << 30 && n % (1 << 30) === 0) return `${n / (1 << 30)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(n % (1 << 20) === 0 ? 0 : 1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(n % (1 << 10) === 0 ? 0 : 1)} KiB`;
  return `${n} B`;
}
