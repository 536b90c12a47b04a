// A small QMP client (QEMU Machine Protocol: one JSON object per line over a unix socket).
// Commands are answered in the order they were sent; asynchronous events are ignored.
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

  close(): void {
    this.#closed ??= new QmpError(`QMP ${this.path}: closed`, { path: this.path });
    this.sock.destroy();
  }

  #onData(d: string): void {
    this.#buf += d;
    for (let nl = this.#buf.indexOf("\n"); nl >= 0; nl = this.#buf.indexOf("\n")) {
      const line = this.#buf.slice(0, nl).trim();
      this.#buf = this.#buf.slice(nl + 1);
      if (line) this.#onMessage(line);
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
    if ("event" in msg) return; // asynchronous events (STOP, RESUME, ...): nothing waits on them
    const p = this.#pending.shift();
    if (!p) return;
    if ("error" in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(`QEMU refused ${p.command}: ${err.desc ?? "unknown error"}`, { path: this.path, command: p.command }, err.class));
    } else {
      p.resolve(msg.return);
    }
  }

  #fail(e: Error): void {
    if (this.#closed) return;
    this.#closed = e;
    for (const p of this.#pending.splice(0)) p.reject(e);
  }
}
