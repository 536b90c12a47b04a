// The shared secret and the challenge-response that proves it. Each side proves it holds the
// token with an HMAC over both sides' fresh nonces; the token itself never crosses the wire.
// The labels differ per direction, so a proof one side sends can never be replayed as the other's.
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { ConfigError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { NONCE_SIZE } from "./protocol.ts";

export const MIN_TOKEN_BYTES = 16;

/** Reads a token file: its bytes, minus trailing whitespace (files usually end in a newline). */
export function readTokenFile(path: string, logger?: Logger): Buffer {
  let raw: Buffer;
  try {
    raw = readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "error";
    throw new ConfigError(`--token-file ${path}: cannot read it (${code})`, { path });
  }
  let end = raw.length;
  while (end > 0 && (raw[end - 1] === 0x0a || raw[end - 1] === 0x0d || raw[end - 1] === 0x20 || raw[end - 1] === 0x09)) end--;
  const token = raw.subarray(0, end);
  if (token.length < MIN_TOKEN_BYTES) {
    throw new ConfigError(
      `--token-file ${path}: the token is ${token.length} bytes; use at least ${MIN_TOKEN_BYTES} (e.g. head -c 32 /dev/urandom | base64 > ${path})`,
      { path },
    );
  }
  try {
    if (statSync(path).mode & 0o077) logger?.warn("config.token_file_mode", `--token-file ${path} is readable by group or others; chmod 600 it`, { path });
  } catch {
    // It was readable a moment ago; the mode check is advice only.
  }
  return Buffer.from(token);
}

export function nonce(): Uint8Array {
  return new Uint8Array(randomBytes(NONCE_SIZE));
}

const CLIENT_LABEL = "snapload-postcopy-v1 client proof";
const SERVER_LABEL = "snapload-postcopy-v1 server proof";

function hmac(token: Buffer, label: string, first: Uint8Array, second: Uint8Array): Uint8Array {
  const h = createHmac("sha256", token);
  h.update(label);
  h.update(first);
  h.update(second);
  return new Uint8Array(h.digest());
}

/** What the client sends: it answers the server's challenge (its nonce first). */
export function clientProof(token: Buffer, serverNonce: Uint8Array, clientNonce: Uint8Array): Uint8Array {
  return hmac(token, CLIENT_LABEL, serverNonce, clientNonce);
}

/** What the server sends back once the client is authenticated (mutual authentication). */
export function serverProof(token: Buffer, clientNonce: Uint8Array, serverNonce: Uint8Array): Uint8Array {
  return hmac(token, SERVER_LABEL, clientNonce, serverNonce);
}

export function proofsEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
