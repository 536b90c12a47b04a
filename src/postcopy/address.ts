// HOST:PORT and tcp://HOST:PORT. The C core takes numeric addresses only, so names are resolved
// once, up front (never on the data path).
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { ConfigError } from "../core/errors.ts";

export interface HostPort {
  host: string;
  port: number;
}

/** Parses `HOST:PORT` or `[IPv6]:PORT`. Port 0 is allowed when `allowZero` (listen: pick one). */
export function parseHostPort(text: string, what: string, allowZero = false): HostPort {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s/]+)):(\d{1,5})$/.exec(text);
  if (!m) throw new ConfigError(`${what} ${JSON.stringify(text)}: expected HOST:PORT (IPv6 as [ADDR]:PORT)`);
  const host = m[1] ?? m[2]!;
  const port = Number(m[3]);
  if (port > 65535 || (port === 0 && !allowZero)) throw new ConfigError(`${what} ${JSON.stringify(text)}: port ${port} is out of range`);
  if (m[1] !== undefined && isIP(host) !== 6) throw new ConfigError(`${what} ${JSON.stringify(text)}: ${host} is not an IPv6 address`);
  return { host, port };
}

/** Parses `tcp://HOST:PORT`. */
export function parseTcpUrl(url: string): HostPort {
  if (!url.startsWith("tcp://")) throw new ConfigError(`--mem ${url}: a page server address looks like tcp://HOST:PORT`);
  return parseHostPort(url.slice("tcp://".length), "--mem tcp://");
}

/** A numeric address for the C core: names are looked up once. */
export async function resolveHost(hp: HostPort, what: string): Promise<HostPort> {
  if (isIP(hp.host)) return hp;
  try {
    const { address } = await lookup(hp.host);
    return { host: address, port: hp.port };
  } catch (e) {
    throw new ConfigError(`${what}: cannot resolve ${hp.host} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
}

export function formatHostPort(hp: HostPort): string {
  return isIP(hp.host) === 6 ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`;
}
