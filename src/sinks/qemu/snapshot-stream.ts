// What a postcopy source needs from a mapped-ram snapshot besides the pages: the configuration
// section (rewritten without its capabilities subsection), the RAM section id, and the device
// state bytes, located without decoding any vmstate (docs/qemu-postcopy-source.md §1, §6).
// The RAM block records and bitmaps come from the existing parser (parseMappedRam).
import { ImageError } from "../../core/errors.ts";
import { sl } from "../../core/ffi.ts";
import { parseMappedRam, parseMappedRamFrom, type MappedRamFile, type Pread } from "../../sources/image/mapped-ram.ts";
import { openRegularFile, preadAt } from "../../sources/image/snapshot-image.ts";

const QEMU_VM_EOF = 0x00;
const SECTION_START = 0x01;
const SECTION_PART = 0x02;
const SECTION_END = 0x03;
const SECTION_FULL = 0x04;
const SUBSECTION = 0x05;
const VMDESCRIPTION = 0x06;
const CONFIGURATION = 0x07;
const COMMAND = 0x08;
const FOOTER = 0x7e;
const RAM_SAVE_FLAG_EOS = 0x10;
const TAIL_CHUNK = 1 << 20;
const MAX_DEVICE_STATE = 256 << 20;

export interface SnapshotStream {
  readonly ram: MappedRamFile;
  readonly machine: string;
  /** Header + configuration as the live stream must carry it (no capabilities subsection). */
  readonly header: Uint8Array;
  /** Capabilities the snapshot's configuration listed (dropped from the live stream). */
  readonly capabilities: string[];
  readonly ramSectionId: number;
  /** [deviceStart, deviceEnd): the FULL sections after the RAM section, up to (not including) EOF. */
  readonly deviceStart: number;
  readonly deviceEnd: number;
  /** Idstrs of the device sections, from the vmdesc JSON when present (first/last for display). */
  readonly devices: string[];
  /** Why this file cannot be served by qemu-restore; empty when it can. */
  readonly refusals: string[];
}

class FileBytes {
  constructor(
    readonly fd: number | Pread,
    readonly path: string,
    readonly size: number,
  ) {}

  read(off: number, len: number, what: string): Uint8Array {
    if (off < 0 || off + len > this.size) {
      throw new ImageError(`${this.path}: file ends at 0x${this.size.toString(16)}, before the ${what} at 0x${off.toString(16)} (truncated file?)`, {
        path: this.path,
        offset: off,
        length: len,
      });
    }
    const out = new Uint8Array(len);
    let done = 0;
    while (done < len) {
      const n = Math.min(len - done, 1 << 24);
      const got = typeof this.fd === "number" ? preadAt(this.fd, out.subarray(done), n, off + done, this.path) : this.fd(out.subarray(done), n, off + done);
      if (got <= 0) throw new ImageError(`${this.path}: short read at 0x${(off + done).toString(16)}`, { path: this.path });
      done += got;
    }
    return out;
  }

  u8(off: number, what: string): number {
    return this.read(off, 1, what)[0]!;
  }

  be16(off: number, what: string): number {
    const b = this.read(off, 2, what);
    return (b[0]! << 8) | b[1]!;
  }

  be32(off: number, what: string): number {
    return new DataView(this.read(off, 4, what).buffer).getUint32(0, false);
  }

  be64(off: number, what: string): bigint {
    return new DataView(this.read(off, 8, what).buffer).getBigUint64(0, false);
  }
}

/** Parses everything but the pages; throws ImageError for files that are not usable at all. */
export function readSnapshotStream(path: string): SnapshotStream {
  const ram = parseMappedRam(path);
  const { fd, size } = openRegularFile(path);
  try {
    return walk(new FileBytes(fd, path, size), ram);
  } finally {
    sl.sl_close(fd);
  }
}

/** readSnapshotStream over any reader (a snapshot that is not a local file); `path` names it in messages. */
export function readSnapshotStreamFrom(read: Pread, size: number, path: string): SnapshotStream {
  return walk(new FileBytes(read, path, size), parseMappedRamFrom(read, size, path));
}

/** readDeviceState over any reader. */
export function readDeviceStateFrom(read: Pread, size: number, s: SnapshotStream): Uint8Array {
  return new FileBytes(read, s.ram.path, size).read(s.deviceStart, s.deviceEnd - s.deviceStart, "device state");
}

function walk(f: FileBytes, ram: MappedRamFile): SnapshotStream {
  const fail = (msg: string, ctx: Record<string, unknown> = {}) => new ImageError(`${f.path}: ${msg}`, { path: f.path, ...ctx });
  const refusals: string[] = [];
  const text = new TextDecoder();

  // ---- configuration: 0x07, be32 len + machine name, subsections ----
  if (f.u8(8, "configuration section") !== CONFIGURATION) throw fail("the stream has no configuration section after its header");
  const nameLen = f.be32(9, "machine name length");
  if (nameLen === 0 || nameLen > 256) throw fail(`implausible machine name length ${nameLen}`);
  const machine = text.decode(f.read(13, nameLen, "machine name"));
  const kept: Uint8Array[] = [f.read(0, 13 + nameLen, "stream header")];
  const capabilities: string[] = [];
  let pos = 13 + nameLen;
  while (pos < ram.ramSectionOffset && f.u8(pos, "configuration subsection") === SUBSECTION) {
    const start = pos;
    const len = f.u8(pos + 1, "subsection name length");
    const name = text.decode(f.read(pos + 2, len, "subsection name"));
    pos += 2 + len + 4; // + be32 version
    if (name === "configuration/capabilities") {
      const count = f.be32(pos, "capability count");
      pos += 4;
      for (let i = 0; i < count; i++) {
        const l = f.u8(pos, "capability name length");
        capabilities.push(text.decode(f.read(pos + 1, l, "capability name")));
        pos += 1 + l;
      }
      continue; // dropped: a postcopy destination cannot have mapped-ram on (doc §1)
    }
    if (name === "configuration/target-page-bits") pos += 4;
    else if (name === "configuration/uuid") pos += 16;
    else {
      refusals.push(`unknown configuration subsection "${name}" (this QEMU is newer than snapload knows)`);
      pos = ram.ramSectionOffset;
      break;
    }
    kept.push(f.read(start, pos - start, "configuration subsection"));
  }
  if (pos !== ram.ramSectionOffset && refusals.length === 0) {
    const type = f.u8(pos, "section type");
    refusals.push(
      type === SECTION_FULL || type === SECTION_START
        ? `a device section precedes the RAM section at 0x${pos.toString(16)} (an early-setup device); its state must load before RAM, which a postcopy stream cannot do`
        : `unexpected bytes between the configuration and the RAM section at 0x${pos.toString(16)}`,
    );
  }
  if (ram.ignoreShared || capabilities.includes("x-ignore-shared")) {
    refusals.push("saved with x-ignore-shared: shared RAM blocks are not in the file, and postcopy cannot be combined with it");
  }
  const header = concat(kept);
  const ramSectionId = f.be32(ram.ramSectionOffset + 1, "RAM section id");
  if (ramSectionId === 0) refusals.push("the RAM section has id 0, which a postcopy destination cannot bind");

  // ---- after the last block: EOS + footer, then PART/END of ram, commands, until a FULL section ----
  const last = ram.blocks[ram.blocks.length - 1]!;
  pos = last.pagesOffset + last.usedLength;
  const eos = (at: number, what: string) => {
    const flags = f.be64(at, what);
    if (flags !== BigInt(RAM_SAVE_FLAG_EOS)) throw fail(`${what} at 0x${at.toString(16)} is 0x${flags.toString(16)}, expected the end-of-section flag`);
  };
  const footer = (at: number, sid: number) => {
    if (f.u8(at, "section footer") !== FOOTER || f.be32(at + 1, "section footer") !== sid) {
      throw fail(`missing section footer for section ${sid} at 0x${at.toString(16)}`);
    }
  };
  eos(pos, "end of the RAM section start");
  footer(pos + 8, ramSectionId);
  pos += 13;
  let deviceStart = -1;
  while (deviceStart < 0) {
    const type = f.u8(pos, "section type");
    if (type === SECTION_PART || type === SECTION_END) {
      const sid = f.be32(pos + 1, "section id");
      if (sid !== ramSectionId) {
        refusals.push(`an iterable section other than ram (section id ${sid}) has data at 0x${pos.toString(16)}`);
        break;
      }
      eos(pos + 5, "RAM section body");
      footer(pos + 13, sid);
      pos += 18;
    } else if (type === COMMAND) {
      pos += 5 + f.be16(pos + 3, "command length");
    } else if (type === SECTION_START) {
      const l = f.u8(pos + 5, "section name length");
      const idstr = text.decode(f.read(pos + 6, l, "section name"));
      refusals.push(`the snapshot has an iterable section "${idstr}" besides ram (e.g. VFIO or dirty bitmaps), which snapload cannot replay`);
      break;
    } else if (type === SECTION_FULL) {
      deviceStart = pos;
    } else if (type === QEMU_VM_EOF) {
      throw fail(`the stream ends at 0x${pos.toString(16)} without any device state`);
    } else {
      throw fail(`unexpected byte 0x${type.toString(16)} at 0x${pos.toString(16)} after the RAM section`);
    }
  }
  if (deviceStart < 0) {
    return { ram, machine, header, capabilities, ramSectionId, deviceStart: 0, deviceEnd: 0, devices: [], refusals };
  }

  // ---- the device state ends at the EOF byte, which the vmdesc (0x06, be32 len, JSON) follows ----
  const { eofAt, devices } = findEof(f, deviceStart, fail);
  // Every section ends with a footer (0x7e, be32 id): a cheap check that the EOF found is real.
  if (eofAt - deviceStart < 5 || f.u8(eofAt - 5, "last section footer") !== FOOTER) {
    throw fail(`the device state at 0x${deviceStart.toString(16)}..0x${eofAt.toString(16)} does not end with a section footer (truncated file?)`);
  }
  const firstLen = f.u8(deviceStart + 5, "first device section name length");
  const first = text.decode(f.read(deviceStart + 6, firstLen, "first device section name"));
  if (devices.length > 0 && devices[0] !== first) {
    throw fail(`the device description names "${devices[0]}" first, but the first device section is "${first}" (corrupt file?)`);
  }
  if (eofAt - deviceStart > MAX_DEVICE_STATE) throw fail(`device state of ${eofAt - deviceStart} bytes is implausibly large`);
  return {
    ram,
    machine,
    header,
    capabilities,
    ramSectionId,
    deviceStart,
    deviceEnd: eofAt,
    devices: devices.length > 0 ? devices : [first],
    refusals,
  };
}

/** Finds the EOF byte from the end of the file (doc §6 step 5); the JSON holds no NUL byte. */
function findEof(f: FileBytes, deviceStart: number, fail: (m: string) => Error): { eofAt: number; devices: string[] } {
  if (f.u8(f.size - 1, "last byte") === QEMU_VM_EOF) {
    // suppress_vmdesc machines end the stream with EOF; a JSON ending in "}" never ends in 0.
    return { eofAt: f.size - 1, devices: [] };
  }
  let end = f.size;
  while (end > deviceStart) {
    const start = Math.max(deviceStart, end - TAIL_CHUNK);
    const chunk = f.read(start, Math.min(end + 5, f.size) - start, "device description");
    for (let i = end - start - 1; i >= 0; i--) {
      if (chunk[i] !== QEMU_VM_EOF || chunk[i + 1] !== VMDESCRIPTION || i + 6 > chunk.length) continue;
      const p = start + i;
      const len = new DataView(chunk.buffer, chunk.byteOffset + i + 2, 4).getUint32(0, false);
      if (p + 6 + len !== f.size) continue;
      let devices: string[] = [];
      try {
        const json = JSON.parse(new TextDecoder().decode(f.read(p + 6, len, "device description"))) as { devices?: { name?: string }[] };
        devices = (json.devices ?? []).map((d) => String(d.name));
      } catch {
        continue;
      }
      return { eofAt: p, devices };
    }
    end = start;
  }
  throw fail("no end of stream found after the device state (truncated file?)");
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Reads the device-state bytes (they are copied verbatim into the postcopy package). */
export function readDeviceState(s: SnapshotStream): Uint8Array {
  const { fd, size } = openRegularFile(s.ram.path);
  try {
    return new FileBytes(fd, s.ram.path, size).read(s.deviceStart, s.deviceEnd - s.deviceStart, "device state");
  } finally {
    sl.sl_close(fd);
  }
}
