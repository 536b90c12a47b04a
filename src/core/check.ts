// Turns a C-core return value (-errno on failure) into a typed error.
import { SyscallError } from "./errors.ts";
import { errnoName } from "./ffi.ts";

export function check(call: string, r: number, context: Record<string, unknown> = {}): number {
  if (r < 0) throw new SyscallError(call, -r, errnoName(-r), context);
  return r;
}
