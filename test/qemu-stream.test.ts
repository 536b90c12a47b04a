// The QEMU sink's pieces without QEMU: the device state located in a mapped-ram file, the files
// qemu-restore refuses, the return-path decoder, and the destination block check.
import { afterAll, describe, expect, test } from "bun:test";
import { openSync, closeSync, writeSync, ftruncateSync } from "node:fs";
import { join } from "node:path";
import { planBlocks, parseRamblockTable } from "../src/sinks/qemu/destination.ts";
import { readDeviceState, readSnapshotStream } from "../src/sinks/qemu/snapshot-stream.ts";
import { ReturnPathDecoder, Rp, type RpMessage } from "../src/sinks/qemu/stream.ts";
import { generateMappedRam } from "./gen-mapped-ram.ts";
import { DEVICE, SID, withQemuTail } from "./qemu-standin.ts";
import { runSnapload, tempDir } from "./harness.ts";

const tmp = tempDir("snapload-qemu-stream-");
afterAll(() => tmp.cleanup());

let n = 0;
const gen = (opts: Parameters<typeof generateMappedRam>[1] = {}) => generateMappedRam(join(tmp.path, `s${n++}.bin`), { ramMiB: 2, expect: false, ...opts });

describe("device state in a mapped-ram file", () => {
  test("found between the RAM section and EOF, with the capabilities dropped from the header", () => {
    const g = gen();
    const { deviceStart, eofAt } = withQemuTail(g);
    const s = readSnapshotStream(g.path);
    expect(s.refusals).toEqual([]);
    expect(s.machine).toBe("pc-i440fx-10.0");
    expect(s.capabilities).toEqual(["mapped-ram"]);
    expect(s.ramSectionId).toBe(SID);
    expect([s.deviceStart, s.deviceEnd]).toEqual([deviceStart, eofAt]);
    expect(Buffer.from(readDeviceState(s)).equals(DEVICE)).toBe(true);
    // QEVM, version, 0x07, be32 length, the machine name: nothing of the capabilities subsection.
    expect(Buffer.from(s.header).toString("latin1")).toBe(`QEVM\0\0\0\x03\x07\0\0\0\x0epc-i440fx-10.0`);
  });

  test("a stream without a vmdesc (suppress_vmdesc) ends at its EOF byte", () => {
    const g = gen();
    const { deviceStart, eofAt } = withQemuTail(g, { vmdesc: false });
    const s = readSnapshotStream(g.path);
    expect([s.deviceStart, s.deviceEnd]).toEqual([deviceStart, eofAt]);
  });

  test("a stream cut at a zero byte inside the device state is not taken for one without a vmdesc", () => {
    const g = gen();
    const { deviceStart } = withQemuTail(g, { vmdesc: false });
    const fd = openSync(g.path, "r+");
    ftruncateSync(fd, deviceStart + DEVICE.indexOf(0) + 1);
    closeSync(fd);
    expect(() => readSnapshotStream(g.path)).toThrow(/does not end with a section footer \(truncated file\?\)/);
  });

  test("a file that is not a mapped-ram stream is an error that says so", () => {
    const raw = join(tmp.path, "raw.mem");
    const fd = openSync(raw, "w");
    writeSync(fd, Buffer.alloc(8192, 1));
    closeSync(fd);
    expect(() => readSnapshotStream(raw)).toThrow(/not a QEMU migration stream/);
    const plain = gen({ capabilities: [] });
    withQemuTail(plain);
    expect(() => readSnapshotStream(plain.path)).toThrow(/not a mapped-ram stream/);
  });

  test("refused: an iterable section other than ram", () => {
    const g = gen();
    withQemuTail(g, { extraStart: "dirty-bitmap" });
    expect(readSnapshotStream(g.path).refusals.join()).toContain(`iterable section "dirty-bitmap"`);
  });

  test("refused: x-ignore-shared", () => {
    const g = gen({ capabilities: ["mapped-ram", "x-ignore-shared"] });
    withQemuTail(g);
    expect(readSnapshotStream(g.path).refusals.join()).toContain("x-ignore-shared");
  });

  test("a file cut inside the device state is an error that says so", () => {
    const g = gen();
    const { deviceStart } = withQemuTail(g);
    const fd = openSync(g.path, "r+");
    ftruncateSync(fd, deviceStart + 10);
    closeSync(fd);
    expect(() => readSnapshotStream(g.path)).toThrow(/truncated file\?/);
  });
});

describe("return path", () => {
  const msg = (type: number, payload: Buffer) => Buffer.concat([Buffer.from([type >> 8, type & 255, payload.length >> 8, payload.length & 255]), payload]);
  const req = (start: number, len: number, name?: string) => {
    const b = Buffer.alloc(12 + (name ? 1 + name.length : 0));
    b.writeBigUInt64BE(BigInt(start));
    b.writeUInt32BE(len, 8);
    if (name) {
      b[12] = name.length;
      b.write(name, 13);
    }
    return msg(name ? Rp.REQ_PAGES_ID : Rp.REQ_PAGES, b);
  };

  test("messages split anywhere decode the same; REQ_PAGES uses the last REQ_PAGES_ID's block", () => {
    const pong = Buffer.alloc(4);
    pong.writeUInt32BE(1);
    const all = Buffer.concat([msg(Rp.PONG, pong), req(0x5000, 4096, "pc.ram"), req(0x9000, 4096), req(0, 4096, "pc.bios"), msg(Rp.SHUT, Buffer.alloc(4))]);
    const want: RpMessage[] = [
      { type: "pong", value: 1 },
      { type: "req", block: "pc.ram", start: 0x5000, length: 4096 },
      { type: "req", block: "pc.ram", start: 0x9000, length: 4096 },
      { type: "req", block: "pc.bios", start: 0, length: 4096 },
      { type: "shut", value: 0 },
    ];
    for (let cut = 0; cut <= all.length; cut++) {
      const d = new ReturnPathDecoder();
      expect([...d.push(all.subarray(0, cut)), ...d.push(all.subarray(cut))]).toEqual(want);
    }
  });

  test("an oversized or malformed message is an error", () => {
    expect(() => new ReturnPathDecoder().push(Buffer.from([0, 3, 0x10, 0]))).toThrow(/more than 512/);
    expect(() => new ReturnPathDecoder().push(msg(Rp.REQ_PAGES, Buffer.alloc(8)))).toThrow(/REQ_PAGES has length 8/);
  });
});

describe("destination blocks", () => {
  const TABLE = `              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007f1d4be00000  rw
    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007f1da3c00000  ro
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000 0x00007f1da4a00000  ro
`;
  const stream = (blocks: [string, number][]) =>
    ({ ram: { blocks: blocks.map(([name, usedLength]) => ({ name, usedLength })) } }) as unknown as Parameters<typeof planBlocks>[0];

  test("parses info ramblock", () => {
    expect(parseRamblockTable(TABLE)).toEqual([
      { name: "pc.ram", pageSize: 4096, used: 0x8000000, total: 0x8000000 },
      { name: "/rom@etc/acpi/tables", pageSize: 4096, used: 0x20000, total: 0x200000 },
      { name: "pc.bios", pageSize: 4096, used: 0x40000, total: 0x40000 },
    ]);
  });

  test("matching blocks pass; a resizable block may differ in length; the summary ORs page sizes", () => {
    const plan = planBlocks(stream([["pc.ram", 0x8000000], ["/rom@etc/acpi/tables", 0x30000]]), parseRamblockTable(TABLE));
    expect(plan.blocks).toEqual([{ name: "pc.ram", usedLength: 0x8000000 }, { name: "/rom@etc/acpi/tables", usedLength: 0x30000 }]);
    expect(plan.pageSizeSummary).toBe(4096);
    expect(plan.extra).toEqual(["pc.bios"]);
  });

  test("every mismatch is listed: size, missing block, huge pages", () => {
    const dest = parseRamblockTable(TABLE.replace("pc.bios    4 KiB", "pc.bios    2 MiB"));
    const run = () => planBlocks(stream([["pc.ram", 0x10000000], ["vga.vram", 0x1000000], ["pc.bios", 0x40000]]), dest);
    expect(run).toThrow(/pc\.ram" is 268435456 bytes in the snapshot but 134217728 on the destination/);
    expect(run).toThrow(/"vga\.vram" \(16777216 bytes\) does not exist on the destination/);
    expect(run).toThrow(/"pc\.bios" uses 2097152-byte pages/);
  });
});

describe("command line", () => {
  test("qemu-restore without --qmp or --to, and with a bad --to: exit 2 naming the flag", async () => {
    const g = gen();
    withQemuTail(g);
    const none = await runSnapload(["qemu-restore", "--mem", g.path]);
    expect(none.code).toBe(2);
    expect(none.stderr).toContain("--qmp: is required (or --to ADDR if you drive QMP yourself)");
    const bad = await runSnapload(["qemu-restore", "--mem", g.path, "--to", "ftp:x"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain(`"ftp:x" is not a migration address: use unix:PATH or tcp:HOST:PORT`);
  });

  test("qemu-save refuses to overwrite a file, before talking to QEMU", async () => {
    const g = gen();
    const r = await runSnapload(["qemu-save", "--qmp", join(tmp.path, "no.qmp"), "--out", g.path]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("exists; qemu-save does not overwrite snapshots");
  });
});
