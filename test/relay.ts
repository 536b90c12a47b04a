// A man in the middle for postcopy tests: an in-process TCP relay between a daemon and a page
// server that records both directions of every connection and may rewrite bytes on the way.
import { createConnection, createServer, type Server, type Socket } from "node:net";

export type Direction = "c2s" | "s2c";

export interface RelayedConnection {
  index: number;
  c2s: Buffer[];
  s2c: Buffer[];
  /** Bytes forwarded so far per direction (stream offsets for the tamper hook). */
  at: Record<Direction, number>;
}

/** Rewrites a chunk in place (or not); `at` is the chunk's offset in that direction's stream. */
export type Tamper = (dir: Direction, conn: RelayedConnection, chunk: Buffer, at: number) => void;

export class Relay {
  readonly conns: RelayedConnection[] = [];
  private server: Server | undefined;
  port = 0;

  private constructor(private readonly target: number, private readonly tamper?: Tamper) {}

  static async start(targetPort: number, tamper?: Tamper): Promise<Relay> {
    const r = new Relay(targetPort, tamper);
    r.server = createServer((client) => r.relay(client));
    await new Promise<void>((resolve) => r.server!.listen(0, "127.0.0.1", resolve));
    r.port = (r.server.address() as { port: number }).port;
    return r;
  }

  private relay(client: Socket): void {
    const conn: RelayedConnection = { index: this.conns.length, c2s: [], s2c: [], at: { c2s: 0, s2c: 0 } };
    this.conns.push(conn);
    const server = createConnection({ host: "127.0.0.1", port: this.target });
    const pipe = (from: Socket, to: Socket, dir: Direction) => {
      from.on("data", (d: Buffer) => {
        const chunk = Buffer.from(d);
        this.tamper?.(dir, conn, chunk, conn.at[dir]);
        conn.at[dir] += chunk.length;
        conn[dir].push(chunk);
        to.write(chunk);
      });
      from.on("end", () => to.end());
      from.on("error", () => to.destroy());
      from.on("close", () => to.destroy());
    };
    pipe(client, server, "c2s");
    pipe(server, client, "s2c");
  }

  /** Everything the server sent (or the client, for "c2s"), all connections, in order. */
  capture(dir: Direction): Buffer {
    return Buffer.concat(this.conns.flatMap((c) => c[dir]));
  }

  close(): void {
    this.server?.close();
  }
}

/**
 * Where `capture` holds a run of at least `min` bytes equal to some run of `image`, or -1.
 * Any such run contains a whole 32-byte-aligned block of the image (min >= 63), so aligned blocks
 * are indexed by their first 6 bytes, candidates compared, and matches grown both ways.
 */
export function findImageRun(capture: Uint8Array, image: Uint8Array, min = 64): number {
  const BLOCK = 32;
  if (min < 2 * BLOCK - 1) throw new Error("findImageRun: min must be at least 63");
  const index = new Map<number, number[]>();
  const key = (b: Uint8Array, at: number) => b[at]! + b[at + 1]! * 2 ** 8 + b[at + 2]! * 2 ** 16 + b[at + 3]! * 2 ** 24 + b[at + 4]! * 2 ** 32 + b[at + 5]! * 2 ** 40;
  for (let o = 0; o + BLOCK <= image.length; o += BLOCK) {
    const k = key(image, o);
    const list = index.get(k);
    if (list === undefined) index.set(k, [o]);
    else if (list.length < 8) list.push(o);
  }
  for (let i = 0; i + BLOCK <= capture.length; i++) {
    const list = index.get(key(capture, i));
    if (list === undefined) continue;
    for (const o of list) {
      let before = 0;
      while (i - before > 0 && o - before > 0 && capture[i - before - 1] === image[o - before - 1]) before++;
      let after = 0;
      while (i + after < capture.length && o + after < image.length && capture[i + after] === image[o + after]) after++;
      if (before + after >= min) return i - before;
    }
  }
  return -1;
}
