// A small QMP client (QEMU Machine Protocol: one JSON object per line over a unix socket).
// Commands are answered in the order they were sent; asynchronous events (STOP, RESUME, MIGRATION,
// ...) go to listeners and into a bounded buffer, so a wait that starts after an event still sees it.
import { connect, type Socket } from "node:net";
import { SnaploadError } from "../../core/errors.ts";

export class QmpError extends SnaploadError {
  /** QMP's error class (e.g. GenericError), when QEMU answered with an error. */
  readonly qmpClass?: string;
  constructor(message: string, context: Record<string, unknown> = {}, qmpClass?: string, options?: { cause?: unknown }) {
    super("QMP", message, context, options);
    this.name = "QmpError";
    if (qmpClass !== undefined) this.qmpClass = qmpClass;
  }
}

/** One asynchronous QMP event, numbered in arrival order on this connection. */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** Arrival number: compare with {@link QmpClient.eventMark}. */
  seq: number;
}

/** How many recent events a client keeps for waits that start late (QEMU sends a handful per migration). */
const RECENT_EVENTS = 256;

/**
 * The longest QMP line taken. QEMU's largest replies (query-qmp-schema) are a few hundred KiB; a
 * peer that never sends a newline must not grow our buffer without bound.
 */
export const MAX_QMP_LINE = 8 << 20;

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

export class QmpClient {
  #buf = "";
  readonly #pending: Pending[] = [];
  #closed: Error | undefined;
  #greeting: ((v: unknown) => void) | undefined;
  readonly #recent: QmpEvent[] = [];
  #seq = 0;
  readonly #listeners = new Set<(e: QmpEvent) => void>();
  readonly #lostWaiters: ((e: Error) => void)[] = [];
  /** waitEvent's waiters: rejected when the connection is lost and also by close() (lost() is not). */
  readonly #eventWaiters: ((e: Error) => void)[] = [];

  private constructor(
    private readonly sock: Socket,
    readonly path: string,
  ) {
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => this.#onData(d));
    sock.on("error", (e: NodeJS.ErrnoException) =>
      this.#fail(new QmpError(`QMP ${path}: connection lost (${e.code ?? e.message}): did QEMU exit?`, { path }, undefined, { cause: e })),
    );
    sock.on("close", () => this.#fail(new QmpError(`QMP ${path}: QEMU closed the connection: did QEMU exit?`, { path })));
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = 5000): Promise<QmpClient> {
    const sock = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new QmpError(`QMP ${path}: no connection within ${timeoutMs} ms`, { path }));
      }, timeoutMs);
      s.once("connect", () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once("error", (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        const hint =
          e.code === "ENOENT" || e.code === "ECONNREFUSED"
            ? " (is QEMU running with -qmp unix:PATH,server=on,wait=off?)"
            : "";
        reject(new QmpError(`QMP ${path}: cannot connect: ${e.code ?? e.message}${hint}`, { path }, undefined, { cause: e }));
      });
    });
    const c = new QmpClient(sock, path);
    try {
      await c.#waitGreeting(timeoutMs);
      await c.execute("qmp_capabilities");
    } catch (e) {
      c.close();
      throw e;
    }
    return c;
  }

  #waitGreeting(timeoutMs: number): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new QmpError(`QMP ${this.path}: no greeting within ${timeoutMs} ms (is another client connected? QEMU serves one at a time)`, { path: this.path }));
      }, timeoutMs);
      this.#greeting = (v) => {
        clearTimeout(timer);
        resolve(v);
      };
      this.#pending.push({ command: "(greeting)", resolve: () => {}, reject: (e) => { clearTimeout(timer); reject(e); } });
    });
  }

  /** Runs one command; resolves with its `return` value, rejects with QEMU's error description. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.#closed) return Promise.reject(this.#closed);
    return new Promise<T>((resolve, reject) => {
      this.#pending.push({ command, resolve: resolve as (v: unknown) => void, reject });
      this.sock.write(`${JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args })}\n`);
    });
  }

  /** `human-monitor-command`: the HMP output as text. */
  hmp(commandLine: string): Promise<string> {
    return this.execute<string>("human-monitor-command", { "command-line": commandLine });
  }

  /** The number the next event will get: events with `seq >= eventMark` arrived after this call. */
  get eventMark(): number {
    return this.#seq;
  }

  /**
   * Calls handler for every event from now on, and first for the buffered ones numbered `since`
   * or later (a mark taken before the command that causes them). Returns the unsubscribe function.
   */
  on(handler: (e: QmpEvent) => void, since = this.#seq): () => void {
    for (const e of this.#recent) if (e.seq >= since) handler(e);
    this.#listeners.add(handler);
    return () => this.#listeners.delete(handler);
  }

  /**
   * Resolves with the first `name` event numbered `since` or later (default: any still buffered)
   * whose data satisfies match; rejects with a QmpError (context.timedOut) after timeoutMs, or
   * when the connection is lost.
   */
  waitEvent(name: string, match: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = 10_000, since = 0): Promise<QmpEvent> {
    return new Promise<QmpEvent>((resolve, reject) => {
      let off = () => {};
      const done = () => {
        clearTimeout(timer);
        off();
        const i = this.#eventWaiters.indexOf(onLost);
        if (i >= 0) this.#eventWaiters.splice(i, 1);
      };
      const onLost = (e: Error) => {
        done();
        reject(e);
      };
      const timer = setTimeout(() => {
        done();
        reject(new QmpError(`QMP ${this.path}: no ${name} event within ${timeoutMs} ms`, { path: this.path, event: name, timedOut: true }));
      }, timeoutMs);
      if (this.#closed) return onLost(this.#closed);
      this.#eventWaiters.push(onLost);
      let found = false;
      off = this.on((e) => {
        if (found || e.event !== name || !match(e.data)) return;
        found = true;
        done();
        resolve(e);
      }, since);
      if (found) off(); // matched in the buffer, before `off` was assigned
    });
  }

  /** Resolves when the connection is lost (not when close() is called): QEMU exited or closed it. */
  lost(): Promise<Error> {
    return new Promise((resolve) => this.#lostWaiters.push(resolve));
  }

  close(): void {
    this.#closed ??= new QmpError(`QMP ${this.path}: closed`, { path: this.path });
    // A wait must not outlive its client until its timeout (its timer would hold the process).
    for (const w of this.#eventWaiters.splice(0)) w(this.#closed);
    this.sock.destroy();
  }

  #onData(d: string): void {
    if (this.#closed) return;
    const scanned = this.#buf.length; // holds no newline: look only at what just came
    this.#buf += d;
    for (let nl = this.#buf.indexOf("\n", scanned); nl >= 0; nl = this.#buf.indexOf("\n")) {
      const line = this.#buf.slice(0, nl).trim();
      this.#buf = this.#buf.slice(nl + 1);
      if (line) this.#onMessage(line);
    }
    if (this.#buf.length > MAX_QMP_LINE) {
      this.#buf = "";
      this.#fail(new QmpError(`QMP ${this.path}: a line longer than ${MAX_QMP_LINE} bytes without a newline: is this QEMU's QMP socket?`, { path: this.path }));
      this.sock.destroy();
    }
  }

  #onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return this.#fail(new QmpError(`QMP ${this.path}: not JSON: ${line.slice(0, 200)}`, { path: this.path }));
    }
    if ("QMP" in msg) {
      this.#pending.shift();
      this.#greeting?.(msg.QMP);
      this.#greeting = undefined;
      return;
    }
    if ("event" in msg) return this.#onEvent(msg);
    const p = this.#pending.shift();
    if (!p) return;
    if ("error" in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(`QEMU refused ${p.command}: ${err.desc ?? "unknown error"}`, { path: this.path, command: p.command }, err.class));
    } else {
      p.resolve(msg.return);
    }
  }

  #onEvent(msg: Record<string, unknown>): void {
    const e: QmpEvent = { event: String(msg.event), data: (msg.data as Record<string, unknown> | undefined) ?? {}, seq: this.#seq++ };
    this.#recent.push(e);
    if (this.#recent.length > RECENT_EVENTS) this.#recent.shift();
    for (const l of [...this.#listeners]) l(e);
  }

  #fail(e: Error): void {
    if (this.#closed) return;
    this.#closed = e;
    for (const p of this.#pending.splice(0)) p.reject(e);
    for (const w of this.#lostWaiters.splice(0)) w(e);
    for (const w of this.#eventWaiters.splice(0)) w(e);
  }
}
