// A stand-in QEMU postcopy destination for the QEMU sink's tests, over real Unix sockets: it
// parses what snapload sends with its own decoder (independent of src/sinks/qemu/stream.ts), answers
// PING, asks for pages, and records every page record with its channel and position. Plus the
// helper that gives generated mapped-ram files the tail QEMU 10.0 writes (device state, EOF).
import { closeSync, ftruncateSync, openSync, writeSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import type { GeneratedMappedRam } from "./gen-mapped-ram.ts";

export const SID = 2; // the generator's ram section id
export const DEVICE = Buffer.concat([
  Buffer.from([0x04, 0, 0, 0, 7, 5]), Buffer.from("timer"), Buffer.from([0, 0, 0, 0, 0, 0, 0, 2]),
  Buffer.from("device bytes \x00\x06 that look like an EOF"), Buffer.from([0x7e, 0, 0, 0, 7]),
]);

/** Rewrites the generator's stand-in tail as QEMU 10.0 writes it (doc §6). */
export function withQemuTail(g: GeneratedMappedRam, opts: { vmdesc?: boolean; extraStart?: string } = {}): { deviceStart: number; eofAt: number } {
  const parts: Buffer[] = [];
  const be32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(v); return b; };
  const eos = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10]);
  const footer = (sid: number) => Buffer.concat([Buffer.from([0x7e]), be32(sid)]);
  parts.push(eos, footer(SID));
  for (let i = 0; i < 2; i++) parts.push(Buffer.from([0x02]), be32(SID), eos, footer(SID));
  parts.push(Buffer.from([0x08, 0x00, 0x0b, 0x00, 0x00])); // SWITCHOVER_START
  if (opts.extraStart) parts.push(Buffer.from([0x01]), be32(9), Buffer.from([opts.extraStart.length]), Buffer.from(opts.extraStart), be32(0), be32(1));
  parts.push(Buffer.from([0x03]), be32(SID), eos, footer(SID));
  const deviceStart = g.endOfBlocks + parts.reduce((n, p) => n + p.length, 0);
  parts.push(DEVICE, Buffer.from([0x00]));
  const eofAt = deviceStart + DEVICE.length;
  if (opts.vmdesc !== false) {
    const json = Buffer.from(JSON.stringify({ page_size: 4096, devices: [{ name: "timer", instance_id: 0 }] }));
    parts.push(Buffer.from([0x06]), be32(json.length), json);
  }
  const tail = Buffer.concat(parts);
  const fd = openSync(g.path, "r+");
  try {
    writeSync(fd, tail, 0, tail.length, g.endOfBlocks);
    ftruncateSync(fd, g.endOfBlocks + tail.length);
  } finally {
    closeSync(fd);
  }
  return { deviceStart, eofAt };
}

const ZERO = 0x02;
const MEM_SIZE = 0x04;
const PAGE = 0x08;
const EOS = 0x10;
const CONTINUE = 0x20;

/** Pulls exact byte counts out of a socket's data as it arrives. */
class Reader {
  #buf = Buffer.alloc(0);
  #want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  #ended: Error | undefined;

  constructor(sock: Socket) {
    sock.on("data", (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      this.#pump();
    });
    sock.on("close", () => {
      this.#ended = new Error("connection closed");
      this.#want?.reject(this.#ended);
    });
  }

  #pump(): void {
    const w = this.#want;
    if (w && this.#buf.length >= w.n) {
      const out = this.#buf.subarray(0, w.n);
      this.#buf = this.#buf.subarray(w.n);
      this.#want = undefined;
      w.resolve(out);
    }
  }

  read(n: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      if (this.#ended && this.#buf.length < n) return reject(this.#ended);
      this.#want = { n, resolve, reject };
      this.#pump();
    });
  }

  async u8(): Promise<number> {
    return (await this.read(1))[0]!;
  }
  async be16(): Promise<number> {
    return (await this.read(2)).readUInt16BE(0);
  }
  async be32(): Promise<number> {
    return (await this.read(4)).readUInt32BE(0);
  }
  async be64(): Promise<number> {
    return Number((await this.read(8)).readBigUInt64BE(0));
  }
  async counted(): Promise<string> {
    return (await this.read(await this.u8())).toString("utf8");
  }
}

export interface Received {
  channel: "main" | "preempt";
  block: string;
  page: number;
  zero: boolean;
  data?: Buffer;
  /** Index among all records, both channels, in arrival order. */
  seq: number;
  /** Main channel: the section (counting from 0) the record came in. */
  section?: number;
}

export interface StandinOptions {
  /** Called once the package (device state) has been read; may send requests. */
  onPackage?: (d: StandinDestination) => void;
  /** Called after every record (e.g. to ask for more pages at chosen moments). */
  onRecord?: (d: StandinDestination, r: Received) => void;
}

export class StandinDestination {
  readonly records: Received[] = [];
  readonly errors: string[] = [];
  header?: Buffer;
  machine = "";
  blocks: { name: string; usedLength: number }[] = [];
  deviceState?: Buffer;
  discards = 0;
  eof = false;
  readonly done: Promise<void>;
  #server: Server;
  #main?: Socket;
  #lastBlock: Record<string, string | undefined> = {};
  #section = 0;
  #resolveDone!: () => void;

  constructor(
    readonly path: string,
    private readonly opts: StandinOptions = {},
  ) {
    this.done = new Promise((r) => (this.#resolveDone = r));
    let conns = 0;
    this.#server = createServer((sock) => {
      const ch = conns++ === 0 ? "main" : "preempt";
      const r = new Reader(sock);
      if (ch === "main") this.#main = sock;
      (ch === "main" ? this.#readMain(r) : this.#readPreempt(r)).catch((e: Error) => {
        if (!this.eof) this.errors.push(`${ch}: ${e.message}`);
      });
    });
  }

  listen(): Promise<void> {
    return new Promise((r) => this.#server.listen(this.path, r));
  }

  close(): void {
    this.#server.close();
    this.#main?.destroy();
  }

  /** Sends REQ_PAGES_ID for one 4 KiB page (the destination's host page). */
  request(block: string, page: number): void {
    const name = Buffer.from(block);
    const m = Buffer.alloc(4 + 13 + name.length);
    m.writeUInt16BE(3, 0);
    m.writeUInt16BE(13 + name.length, 2);
    m.writeBigUInt64BE(BigInt(page * 4096), 4);
    m.writeUInt32BE(4096, 12);
    m[16] = name.length;
    name.copy(m, 17);
    this.#main!.write(m);
  }

  #rp(type: number, value: number): void {
    const m = Buffer.alloc(8);
    m.writeUInt16BE(type, 0);
    m.writeUInt16BE(4, 2);
    m.writeUInt32BE(value, 4);
    this.#main!.write(m);
  }

  async #record(r: Reader, channel: "main" | "preempt", first: number): Promise<boolean> {
    const word = first;
    const flags = word % 4096;
    const offset = word - flags;
    if (flags & EOS) {
      if (channel === "preempt") this.errors.push("EOS on the preempt channel");
      return false;
    }
    if (flags & ~(ZERO | PAGE | CONTINUE)) this.errors.push(`flags 0x${flags.toString(16)} not allowed in postcopy`);
    let block = this.#lastBlock[channel];
    if (!(flags & CONTINUE)) block = this.#lastBlock[channel] = await r.counted();
    if (block === undefined) this.errors.push(`${channel}: CONTINUE before any block name`);
    const rec: Received = { channel, block: block ?? "?", page: offset / 4096, zero: (flags & ZERO) !== 0, seq: this.records.length };
    if (flags & ZERO) {
      if ((await r.u8()) !== 0) this.errors.push("ZERO record with a non-zero fill byte");
    } else rec.data = Buffer.from(await r.read(4096));
    if (channel === "main") rec.section = this.#section;
    this.records.push(rec);
    this.opts.onRecord?.(this, rec);
    return true;
  }

  async #readPreempt(r: Reader): Promise<void> {
    for (;;) if (!(await this.#record(r, "preempt", await r.be64()))) return;
  }

  async #readMain(r: Reader): Promise<void> {
    const head = await r.read(13);
    if (head.subarray(0, 4).toString() !== "QEVM" || head.readUInt32BE(4) !== 3 || head[8] !== 7) this.errors.push("bad stream header");
    this.machine = (await r.read(head.readUInt32BE(9))).toString();
    let sid = -1;
    for (;;) {
      const type = await r.u8();
      if (type === 0x00) {
        this.eof = true;
        this.#rp(1, 0); // SHUT 0
        this.#resolveDone();
        return;
      }
      if (type === 0x05) this.errors.push("a configuration subsection was sent (capabilities must be dropped)");
      if (type === 0x08) {
        const cmd = await r.be16();
        const payload = await r.read(await r.be16());
        if (cmd === 2) this.#rp(2, payload.readUInt32BE(0)); // PING -> PONG
        else if (cmd === 6) this.discards++;
        else if (cmd === 7) {
          const blob = await r.read(payload.readUInt32BE(0));
          const listen = Buffer.from([8, 0, 4, 0, 0]);
          const run = Buffer.from([8, 0, 5, 0, 0]);
          if (this.discards === 0) this.errors.push("PACKAGED before any POSTCOPY_RAM_DISCARD");
          if (!blob.subarray(0, 5).equals(listen) || !blob.subarray(blob.length - 5).equals(run)) this.errors.push("package is not LISTEN ... RUN");
          this.deviceState = Buffer.from(blob.subarray(5, blob.length - 5));
          this.opts.onPackage?.(this);
        }
        continue;
      }
      if (type === 0x01) {
        sid = await r.be32();
        if ((await r.counted()) !== "ram" || (await r.be32()) !== 0 || (await r.be32()) !== 4) this.errors.push("bad ram START");
        const total = (await r.be64()) - MEM_SIZE;
        let sum = 0;
        while (sum < total) {
          const name = await r.counted();
          const usedLength = await r.be64();
          this.blocks.push({ name, usedLength });
          sum += usedLength;
        }
        if ((await r.be64()) !== EOS) this.errors.push("ram START without EOS");
        if ((await r.u8()) !== 0x7e || (await r.be32()) !== sid) this.errors.push("ram START footer");
        continue;
      }
      if (type === 0x02 || type === 0x03) {
        if ((await r.be32()) !== sid) this.errors.push("section id differs from the ram START's");
        while (await this.#record(r, "main", await r.be64())) {}
        if ((await r.u8()) !== 0x7e || (await r.be32()) !== sid) this.errors.push("section footer");
        this.#section++;
        continue;
      }
      this.errors.push(`unexpected byte 0x${type.toString(16)} on the main channel`);
      return;
    }
  }
}
