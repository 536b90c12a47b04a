// Rate-limited logging for events a hostile peer can cause at will (pre-authentication
// refusals, evictions, accept failures): a burst of lines per window and category, then one
// line saying how many were suppressed, so a flood cannot drown the log or the loop.
import type { EventName, Fields, Logger, LogLevel } from "./log.ts";

export class LogLimiter {
  private readonly windows = new Map<string, { start: number; lines: number; suppressed: number }>();

  constructor(private readonly logger: Logger, private readonly perWindow = 20, private readonly windowMs = 1000) {}

  log(category: string, level: LogLevel, event: EventName, message: string, fields?: Fields): void {
    if (!this.logger.enabled(level)) return;
    const now = performance.now();
    let w = this.windows.get(category);
    if (w === undefined || now - w.start >= this.windowMs) {
      if (w !== undefined && w.suppressed > 0) this.summary(category, level, w.suppressed, now - w.start);
      w = { start: now, lines: 0, suppressed: 0 };
      this.windows.set(category, w);
    }
    if (w.lines < this.perWindow) {
      w.lines++;
      this.logger.log(level, event, message, fields);
    } else {
      w.suppressed++;
    }
  }

  /** Says what was suppressed so far (at shutdown). */
  flush(level: LogLevel = "warn"): void {
    const now = performance.now();
    for (const [category, w] of this.windows) if (w.suppressed > 0) this.summary(category, level, w.suppressed, now - w.start);
    this.windows.clear();
  }

  private summary(category: string, level: LogLevel, n: number, ms: number): void {
    this.logger.log(level, "log.suppressed", `${n} more ${category} lines suppressed in the last ${(ms / 1000).toFixed(1)} s`, { category, suppressed: n, seconds: ms / 1000 });
  }
}
