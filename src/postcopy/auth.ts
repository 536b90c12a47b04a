// The shared secret, the challenge-response that proves it, and the session keys. Each side
// proves it holds the token with an HMAC over the handshake transcript (HELLO and CHALLENGE
// payloads: both fresh nonces, versions, role, flags); the token itself never crosses the wire.
// The labels differ per direction, so a proof one side sends can never be replayed as the other's.
// The keys that seal everything after the handshake come from HKDF over the same inputs.
import { createHmac, hkdfSync, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { ConfigError } from "../core/errors.ts";
import type { Logger } from "../core/log.ts";
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

const CLIENT_LABEL = "snapload-postcopy-v2 client proof";
const SERVER_LABEL = "snapload-postcopy-v2 server proof";
const CLIENT_KEY_LABEL = "snapload-postcopy-v2 client-to-server key";
const SERVER_KEY_LABEL = "snapload-postcopy-v2 server-to-client key";

/** What both sides said in clear before proving anything: HELLO's and CHALLENGE's payloads. */
export interface Transcript {
  hello: Uint8Array;
  challenge: Uint8Array;
}

function hmac(token: Buffer, label: string, t: Transcript): Uint8Array {
  const h = createHmac("sha256", token);
  h.update(label);
  h.update(t.hello);
  h.update(t.challenge);
  return new Uint8Array(h.digest());
}

/** What the client sends: it answers the server's challenge. */
export function clientProof(token: Buffer, t: Transcript): Uint8Array {
  return hmac(token, CLIENT_LABEL, t);
}

/** What the server sends back once the client is authenticated (mutual authentication). */
export function serverProof(token: Buffer, t: Transcript): Uint8Array {
  return hmac(token, SERVER_LABEL, t);
}

/**
 * The two AES-256-GCM keys of one connection, one per direction: HKDF-SHA256 of the token,
 * salted with the transcript (so with both fresh nonces: new keys on every connection).
 */
export function sessionKeys(token: Buffer, t: Transcript): { clientToServer: Uint8Array; serverToClient: Uint8Array } {
  const salt = Buffer.concat([t.hello, t.challenge]);
  const key = (label: string) => new Uint8Array(hkdfSync("sha256", token, salt, label, 32));
  return { clientToServer: key(CLIENT_KEY_LABEL), serverToClient: key(SERVER_KEY_LABEL) };
}

export function proofsEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
