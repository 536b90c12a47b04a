// Errors of the snapshot store: one clear line each, with the object (key) that caused it.
import { type ErrorCode, SnaploadError } from "../../core/errors.ts";

export type StoreErrorCode = Extract<ErrorCode, "STORE_UNAVAILABLE" | "NOT_FOUND" | "BAD_MANIFEST" | "BAD_CHUNK" | "BAD_CONFIG">;

export class StoreError extends SnaploadError {
  constructor(code: StoreErrorCode, message: string, context: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(code, message, context);
    this.name = "StoreError";
    if (options?.cause !== undefined) (this as { cause?: unknown }).cause = options.cause;
  }
}
