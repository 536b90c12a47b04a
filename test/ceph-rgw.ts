// A throwaway single-node Ceph cluster on loopback for the S3 store tests and bench: one mon,
// one memstore OSD, pools of size 1, cephx off, and a RADOS Gateway (beast) with one S3 user.
// The settings that make it come up in ~1-2 s and behave are in shared/docs/facts.md:
// paxos_propose_interval small, `ms_mon_client_mode = crc secure` (else radosgw retries auth
// forever with auth none), tcp_nodelay on beast (else small GETs take ~44 ms).
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const CEPH_BINARIES = ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph"];

/** Undefined when every binary is installed; else the command that installs them. */
export function cephMissing(): string | undefined {
  const missing = CEPH_BINARIES.filter((b) => Bun.which(b) === null);
  if (missing.length === 0) return undefined;
  return `missing ${missing.join(", ")}: run \`apt-get install -y ceph-mon ceph-osd radosgw ceph-common\` (or \`bash scripts/ensure-deps.sh\` as root)`;
}

export interface Rgw {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** Environment for a snapload child process talking to this gateway. */
  env: Record<string, string>;
  dir: string;
  /** Kills the gateway only (the cluster stays): the store "goes down". */
  stopGateway(): Promise<void>;
  /** Starts the gateway again on the same port; resolves once S3 answers. */
  startGateway(): Promise<void>;
  /** SIGSTOP / SIGCONT the gateway: connections are accepted by the kernel, nothing answers. */
  freezeGateway(frozen: boolean): void;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  const s = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = s.port;
  s.stop(true);
  return port;
}

function run(cmd: string[], what: string): string {
  const r = Bun.spawnSync(cmd, { stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`${what} failed (exit ${r.exitCode}): ${cmd.join(" ")}\n${r.stderr.toString()}${r.stdout.toString()}`);
  return r.stdout.toString();
}

async function waitFor(what: string, timeoutMs: number, probe: () => Promise<boolean>, procs: Bun.Subprocess[]): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await probe()) return;
    for (const p of procs) if (p.exitCode !== null) throw new Error(`${what}: a ceph daemon exited (${p.exitCode}) while waiting`);
    if (Date.now() > deadline) throw new Error(`${what}: not ready within ${timeoutMs} ms`);
    // Polling a daemon that has no readiness notification: nothing to wait on but time.
    await Bun.sleep(50);
  }
}

/** Starts mon + osd + radosgw in a fresh directory; resolves once S3 answers. */
export async function startRgw(): Promise<Rgw> {
  const dir = join(tmpdir(), `snapload-ceph-${process.pid}-${Date.now()}`);
  mkdirSync(join(dir, "run"), { recursive: true });
  mkdirSync(join(dir, "log"), { recursive: true });
  mkdirSync(join(dir, "osd0"), { recursive: true });
  const fsid = crypto.randomUUID();
  const monPort = await freePort();
  const rgwPort = await freePort();
  const conf = join(dir, "ceph.conf");
  writeFileSync(
    conf,
    `[global]
fsid = ${fsid}
mon_host = v2:127.0.0.1:${monPort}
public_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc secure
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
paxos_propose_interval = 0.02
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_warn_on_pool_no_redundancy = false
run_dir = ${dir}/run
admin_socket = ${dir}/run/$name.asok
log_file = ${dir}/log/$name.log
pid_file = ${dir}/run/$name.pid
keyring = /dev/null
[mon.a]
mon_data = ${dir}/mon
[osd.0]
osd_data = ${dir}/osd0
osd_objectstore = memstore
memstore_device_bytes = 2147483648
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:${rgwPort} tcp_nodelay=1
rgw_data = ${dir}/rgw
`,
  );
  const c = ["-c", conf];
  run(["monmaptool", "--create", "--clobber", "--addv", "a", `[v2:127.0.0.1:${monPort}]`, "--fsid", fsid, join(dir, "monmap")], "monmaptool");
  run(["ceph-mon", ...c, "--mkfs", "-i", "a", "--monmap", join(dir, "monmap")], "ceph-mon --mkfs");
  const procs: Bun.Subprocess[] = [];
  const spawn = (cmd: string[]) => {
    const p = Bun.spawn(cmd, { stdin: "ignore", stdout: "ignore", stderr: "ignore" });
    procs.push(p);
    return p;
  };
  const stop = async () => {
    for (const p of procs.reverse()) if (p.exitCode === null) p.kill("SIGKILL");
    await Promise.all(procs.map((p) => p.exited));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    spawn(["ceph-mon", ...c, "-f", "-i", "a"]);
    const osdUuid = crypto.randomUUID();
    run(["ceph", ...c, "--connect-timeout", "20", "osd", "new", osdUuid], "ceph osd new");
    run(["ceph-osd", ...c, "-i", "0", "--mkfs", "--osd-uuid", osdUuid], "ceph-osd --mkfs");
    spawn(["ceph-osd", ...c, "-f", "-i", "0"]);
    const endpoint = `http://127.0.0.1:${rgwPort}`;
    let gateway: Bun.Subprocess | undefined;
    const startGateway = async () => {
      if (gateway !== undefined && gateway.exitCode === null) return;
      gateway = spawn(["radosgw", ...c, "-f", "-n", "client.rgw"]);
      await waitFor("radosgw", 60_000, async () => {
        try {
          const r = await fetch(endpoint);
          await r.arrayBuffer();
          return r.status === 200;
        } catch {
          return false;
        }
      }, [gateway]);
    };
    const stopGateway = async () => {
      if (gateway === undefined) return;
      gateway.kill("SIGKILL");
      await gateway.exited;
      gateway = undefined;
    };
    await startGateway();
    const accessKeyId = "SNAPLOADTESTKEY";
    const secretAccessKey = "snaploadtestsecret";
    run(["radosgw-admin", ...c, "user", "create", "--uid", "snapload", "--display-name", "snapload", "--access-key", accessKeyId, "--secret", secretAccessKey], "radosgw-admin user create");
    return {
      endpoint,
      accessKeyId,
      secretAccessKey,
      dir,
      env: { AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey, AWS_REGION: "us-east-1" },
      startGateway,
      stopGateway,
      freezeGateway: (frozen: boolean) => gateway?.kill(frozen ? "SIGSTOP" : "SIGCONT"),
      stop,
    };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** Creates a bucket on the gateway (names need >= 3 characters). Bun's S3 client has no CreateBucket. */
export function createBucket(rgw: Rgw, bucket: string): void {
  run(
    ["curl", "-sS", "--fail-with-body", "-X", "PUT", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", `${rgw.accessKeyId}:${rgw.secretAccessKey}`,
      "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", `${rgw.endpoint}/${bucket}`],
    `create bucket ${bucket}`,
  );
}
