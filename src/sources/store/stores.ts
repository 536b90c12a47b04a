// Where store objects live: `file://DIR`, `s3://BUCKET/PREFIX` (Bun's S3 client, any
// S3-compatible endpoint, path-style) and `http(s)://BASE` (read-only, any web server or CDN).
// The same key layout everywhere (docs/store-format.md), so a file:// store copied to a bucket or
// published by a web server is the same store.
import { type Dirent, mkdirSync, readdirSync, readFileSync, renameSync, statSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { ConfigError } from "../../core/errors.ts";
import { StoreError } from "./errors.ts";
import { NAME_RE } from "./format.ts";

export interface ObjectStore {
  /** The store as the user named it (for messages). */
  readonly url: string;
  readonly writable: boolean;
  /** The object's bytes, or undefined when there is no such object. Throws StoreError otherwise. */
  get(key: string): Promise<Uint8Array | undefined>;
  /** The object's size (a HEAD), or undefined when there is no such object. */
  size(key: string): Promise<number | undefined>;
  put(key: string, data: Uint8Array): Promise<void>;
  /**
   * Objects under `prefix` with their sizes, at most `pages` requests' worth (1000 keys each);
   * `complete` says whether that was all of them. Absent: the store cannot list (HEAD instead).
   */
  list?(prefix: string, pages: number): Promise<{ objects: Map<string, number>; complete: boolean }>;
}

/** Keys per page of a listing (S3's maximum). */
export const LIST_PAGE = 1000;

/** A failure that retrying cannot fix (refused credentials, a read-only store): fail at once. */
export class PermanentStoreError extends StoreError {}

export interface StoreOptions {
  /** S3-compatible endpoint (Ceph RGW, MinIO, R2...); else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS. */
  s3Endpoint?: string;
  /** s3://: objects larger than this go up in parts of this size, several at once (S3's minimum: 5 MiB). */
  partSize?: number;
}

/** Multipart above this (a manifest of a large image; chunks stay below it). */
export const DEFAULT_PART_SIZE = 8 * 1024 * 1024;
/** Parts of one object in flight at once. */
const PART_QUEUE = 8;
/** S3's (and Bun's) smallest part. */
export const MIN_PART_SIZE = 5 * 1024 * 1024;

/** Splits `STORE/NAME` into the store and the snapshot name (its last path component). */
export function parseStoreRef(ref: string, opts: StoreOptions = {}): { store: ObjectStore; name: string } {
  const cut = ref.replace(/\/+$/, "").lastIndexOf("/");
  const base = ref.slice(0, cut);
  const name = ref.slice(cut + 1).replace(/\/+$/, "");
  if (!isStoreUrl(ref) || cut < 0 || !NAME_RE.test(name)) {
    throw new ConfigError(`${ref}: expected STORE/NAME with STORE one of file://DIR, s3://BUCKET[/PREFIX], http(s)://URL and NAME made of letters, digits, '.', '_', '-'`);
  }
  return { store: openStore(base, opts), name };
}

export function isStoreUrl(s: string): boolean {
  return /^(file|s3|https?):\/\//.test(s);
}

export function openStore(url: string, opts: StoreOptions = {}): ObjectStore {
  if (url.startsWith("file://")) return new FileStore(url);
  if (url.startsWith("s3://")) return new S3Store(url, opts);
  if (url.startsWith("http://") || url.startsWith("https://")) return new HttpStore(url);
  throw new ConfigError(`${url}: not a store URL (file://, s3://, http://, https://)`);
}

// ---- file:// ----------------------------------------------------------------------------------

class FileStore implements ObjectStore {
  readonly writable = true;
  readonly root: string;

  constructor(readonly url: string) {
    const path = url.slice("file://".length);
    if (path === "") throw new ConfigError(`${url}: file:// needs a directory`);
    this.root = resolve(path);
  }

  async get(key: string): Promise<Uint8Array | undefined> {
    try {
      return new Uint8Array(readFileSync(join(this.root, key)));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new StoreError("STORE_UNAVAILABLE", `${this.url}: reading ${key}: ${(e as Error).message}`, { key }, { cause: e });
    }
  }

  async size(key: string): Promise<number | undefined> {
    try {
      return statSync(join(this.root, key)).size;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new StoreError("STORE_UNAVAILABLE", `${this.url}: stat ${key}: ${(e as Error).message}`, { key }, { cause: e });
    }
  }

  async list(prefix: string, pages: number): Promise<{ objects: Map<string, number>; complete: boolean }> {
    const objects = new Map<string, number>();
    // Keys are paths: the prefix's directory, its entries that start with the rest, all below those.
    const cut = prefix.lastIndexOf("/") + 1;
    const walk = (rel: string, deep: boolean, start: string): boolean => {
      let entries: Dirent[];
      try {
        entries = readdirSync(join(this.root, rel), { withFileTypes: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === "ENOENT") return true;
        throw new StoreError("STORE_UNAVAILABLE", `${this.url}: listing ${prefix}: ${(e as Error).message}`, { prefix }, { cause: e });
      }
      for (const e of entries) {
        // Temp files of a write in progress start with ".".
        if (e.name.startsWith(".") || (!deep && !e.name.startsWith(start))) continue;
        const key = `${rel}${e.name}`;
        if (e.isDirectory()) {
          if (!walk(`${key}/`, true, "")) return false;
        } else if (e.isFile()) {
          if (objects.size >= pages * LIST_PAGE) return false;
          try {
            objects.set(key, statSync(join(this.root, key)).size);
          } catch {}
        }
      }
      return true;
    };
    const complete = walk(prefix.slice(0, cut), false, prefix.slice(cut));
    return { objects, complete };
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const path = join(this.root, key);
    // Temp file + rename: a reader (or an interrupted push) never sees half an object.
    const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`);
    try {
      mkdirSync(dirname(path), { recursive: true });
      writeFileSync(tmp, data);
      renameSync(tmp, path);
    } catch (e) {
      throw new StoreError("STORE_UNAVAILABLE", `${this.url}: writing ${key}: ${(e as Error).message}`, { key }, { cause: e });
    }
  }
}

// ---- s3:// ------------------------------------------------------------------------------------

/** S3 error codes that no retry can fix. */
const PERMANENT_S3 = new Set([
  "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
  "ERR_S3_MISSING_CREDENTIALS", "ERR_S3_INVALID_PATH",
]);

interface AwsCredentials {
  accessKeyId?: string;
  secretAccessKey?: string;
  sessionToken?: string;
  region?: string;
}

/** AWS_* environment variables first, then the shared credentials/config files' profile (AWS_PROFILE or default). */
export function awsCredentials(env: NodeJS.ProcessEnv = process.env): AwsCredentials {
  const out: AwsCredentials = {
    accessKeyId: env.AWS_ACCESS_KEY_ID,
    secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
    sessionToken: env.AWS_SESSION_TOKEN,
    region: env.AWS_REGION ?? env.AWS_DEFAULT_REGION,
  };
  if (out.accessKeyId !== undefined && out.region !== undefined) return out;
  const profile = env.AWS_PROFILE ?? "default";
  const creds = readIni(env.AWS_SHARED_CREDENTIALS_FILE ?? join(homedir(), ".aws", "credentials"))[profile];
  const config = readIni(env.AWS_CONFIG_FILE ?? join(homedir(), ".aws", "config"))[profile === "default" ? "default" : `profile ${profile}`];
  if (out.accessKeyId === undefined && creds !== undefined) {
    out.accessKeyId = creds.aws_access_key_id;
    out.secretAccessKey = creds.aws_secret_access_key;
    out.sessionToken = creds.aws_session_token;
  }
  out.region ??= config?.region;
  return out;
}

function readIni(path: string): Record<string, Record<string, string>> {
  const out: Record<string, Record<string, string>> = {};
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return out;
  }
  let section: Record<string, string> | undefined;
  for (const line of text.split("\n")) {
    const t = line.trim();
    const head = t.match(/^\[(.+)\]$/);
    if (head) section = out[head[1]!.trim()] ??= {};
    else if (section && t.includes("=") && !t.startsWith("#") && !t.startsWith(";")) {
      const i = t.indexOf("=");
      section[t.slice(0, i).trim()] = t.slice(i + 1).trim();
    }
  }
  return out;
}

class S3Store implements ObjectStore {
  readonly writable = true;
  private readonly client: Bun.S3Client;
  private readonly prefix: string;
  readonly bucket: string;
  private readonly partSize: number;

  constructor(readonly url: string, opts: StoreOptions) {
    const rest = url.slice("s3://".length);
    const slash = rest.indexOf("/");
    this.bucket = slash < 0 ? rest : rest.slice(0, slash);
    const prefix = slash < 0 ? "" : rest.slice(slash + 1).replace(/^\/+|\/+$/g, "");
    this.prefix = prefix ? `${prefix}/` : "";
    if (this.bucket.length < 3) throw new ConfigError(`${url}: bucket names have at least 3 characters`);
    this.partSize = opts.partSize ?? DEFAULT_PART_SIZE;
    if (this.partSize < MIN_PART_SIZE) throw new ConfigError(`${url}: part size ${this.partSize} is below S3's minimum of ${MIN_PART_SIZE} bytes (5 MiB)`);
    const c = awsCredentials();
    const endpoint = opts.s3Endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL;
    if (c.accessKeyId === undefined || c.secretAccessKey === undefined) {
      throw new ConfigError(`${url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile in ~/.aws/credentials, AWS_PROFILE)`);
    }
    this.client = new Bun.S3Client({
      bucket: this.bucket,
      accessKeyId: c.accessKeyId,
      secretAccessKey: c.secretAccessKey,
      sessionToken: c.sessionToken,
      region: c.region ?? "us-east-1",
      endpoint,
      // Path-style (the default of Bun's client): S3-compatible stores on an IP or without
      // wildcard DNS cannot do virtual-hosted buckets.
      virtualHostedStyle: false,
    });
  }

  private fail(what: string, key: string, e: unknown): StoreError {
    const code = (e as { code?: string }).code ?? "";
    const msg = (e as Error).message?.split("\n")[0]?.replace(/<[^>]+>/g, " ").replace(/\s+/g, " ").trim();
    const text = `${this.url}: ${what} ${key}: ${code || msg}${code && msg && !msg.includes(code) ? ` (${msg.slice(0, 120)})` : ""}`;
    return PERMANENT_S3.has(code) ? new PermanentStoreError("STORE_UNAVAILABLE", text, { key, code }, { cause: e }) : new StoreError("STORE_UNAVAILABLE", text, { key, code }, { cause: e });
  }

  async get(key: string): Promise<Uint8Array | undefined> {
    try {
      return new Uint8Array(await this.client.file(this.prefix + key).arrayBuffer());
    } catch (e) {
      if ((e as { code?: string }).code === "NoSuchKey") return undefined;
      throw this.fail("GET", key, e);
    }
  }

  async size(key: string): Promise<number | undefined> {
    try {
      return (await this.client.stat(this.prefix + key)).size;
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === "NoSuchKey" || code === "NotFound") return undefined;
      throw this.fail("HEAD", key, e);
    }
  }

  async list(prefix: string, pages: number): Promise<{ objects: Map<string, number>; complete: boolean }> {
    const objects = new Map<string, number>();
    let token: string | undefined;
    for (let page = 0; page < pages; page++) {
      let r: Awaited<ReturnType<Bun.S3Client["list"]>>;
      try {
        r = await this.client.list({ prefix: this.prefix + prefix, maxKeys: LIST_PAGE, ...(token !== undefined ? { continuationToken: token } : {}) });
      } catch (e) {
        throw this.fail("LIST", prefix, e);
      }
      for (const o of r.contents ?? []) objects.set(o.key.slice(this.prefix.length), o.size ?? 0);
      if (!r.isTruncated || r.nextContinuationToken === undefined) return { objects, complete: true };
      token = r.nextContinuationToken;
    }
    return { objects, complete: false };
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    try {
      if (data.length <= this.partSize) await this.client.write(this.prefix + key, data);
      else {
        // Multipart: parts go up several at once; the object appears only when the upload
        // completes (so a manifest is still all or nothing), and a failed one is aborted.
        const w = this.client.file(this.prefix + key).writer({ partSize: this.partSize, queueSize: PART_QUEUE });
        w.write(data);
        await w.end();
      }
    } catch (e) {
      throw this.fail("PUT", key, e);
    }
  }
}

// ---- http(s):// (read-only) ------------------------------------------------------------------

class HttpStore implements ObjectStore {
  readonly writable = false;
  private readonly base: string;

  constructor(readonly url: string) {
    this.base = url.replace(/\/+$/, "");
  }

  async get(key: string): Promise<Uint8Array | undefined> {
    let r: Response;
    try {
      r = await fetch(`${this.base}/${key}`);
    } catch (e) {
      throw new StoreError("STORE_UNAVAILABLE", `${this.url}: GET ${key}: ${(e as Error).message}`, { key }, { cause: e });
    }
    if (r.status === 404) {
      await r.body?.cancel();
      return undefined;
    }
    if (r.status !== 200) {
      await r.body?.cancel();
      const text = `${this.url}: GET ${key}: HTTP ${r.status} ${r.statusText}`;
      throw r.status === 401 || r.status === 403 ? new PermanentStoreError("STORE_UNAVAILABLE", text, { key }) : new StoreError("STORE_UNAVAILABLE", text, { key });
    }
    return new Uint8Array(await r.arrayBuffer());
  }

  async size(key: string): Promise<number | undefined> {
    const r = await fetch(`${this.base}/${key}`, { method: "HEAD" }).catch((e) => {
      throw new StoreError("STORE_UNAVAILABLE", `${this.url}: HEAD ${key}: ${(e as Error).message}`, { key }, { cause: e });
    });
    if (r.status === 404) return undefined;
    if (r.status !== 200) throw new StoreError("STORE_UNAVAILABLE", `${this.url}: HEAD ${key}: HTTP ${r.status}`, { key });
    return Number(r.headers.get("content-length"));
  }

  async put(key: string): Promise<void> {
    throw new PermanentStoreError("BAD_CONFIG", `${this.url}: http(s):// stores are read-only; push to file:// or s3:// and publish that (cannot write ${key})`);
  }
}
