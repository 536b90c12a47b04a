// Errno names and numbers come from the runtime (src/core/ffi.ts): every errno the OS defines gets a
// name of its own number, including those Bun's libuv table lacks.
import { expect, test } from "bun:test";
import { constants } from "node:os";
import { Errno, errnoName } from "../src/core/ffi.ts";
import { ensureBuilt } from "./harness.ts";

ensureBuilt();

test("every errno of os.constants.errno is named by a name for that number", () => {
  const byName = constants.errno as Record<string, number>;
  const numbers = new Set(Object.values(byName));
  expect(numbers.size).toBeGreaterThan(70);
  for (const n of numbers) {
    const name = errnoName(n);
    expect(byName[name], `errno ${n} named ${name}`).toBe(n);
  }
});

test("familiar names; an unknown number says so", () => {
  expect(errnoName(Errno.ENOENT)).toBe("ENOENT");
  expect(errnoName(Errno.EAGAIN)).toBe("EAGAIN");
  expect(errnoName(Errno.EINPROGRESS)).toBe("EINPROGRESS");
  expect(errnoName(Errno.EEXIST)).toBe("EEXIST");
  expect(errnoName(100_000)).toBe("errno 100000");
  expect(errnoName(0)).toBe("errno 0");
});

