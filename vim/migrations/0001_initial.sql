-- The schema as of the first migration. Valid in SQLite and PostgreSQL alike (vimd speaks both
-- through sqlx's Any driver): TEXT, BIGINT, DOUBLE PRECISION only. IF NOT EXISTS, so a database
-- made by a vimd from before migrations (the same tables and columns) is adopted as it is.
CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY, hostname TEXT NOT NULL DEFAULT '', address TEXT NOT NULL DEFAULT '',
    cpu_cores BIGINT NOT NULL DEFAULT 0, memory_mib BIGINT NOT NULL DEFAULT 0,
    agent_version TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    last_heartbeat BIGINT NOT NULL DEFAULT 0, missed BIGINT NOT NULL DEFAULT 0,
    nats_user TEXT NOT NULL, nats_password TEXT NOT NULL, created_at BIGINT NOT NULL);

CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY, kernel TEXT NOT NULL, initrd TEXT NOT NULL, cmdline TEXT NOT NULL,
    disk TEXT NOT NULL, created_at BIGINT NOT NULL);

CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, owner TEXT NOT NULL, image TEXT NOT NULL,
    vcpus BIGINT NOT NULL, memory_mib BIGINT NOT NULL, host_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL, disk_path TEXT NOT NULL DEFAULT '', pid BIGINT NOT NULL DEFAULT 0,
    cpu_pct DOUBLE PRECISION NOT NULL DEFAULT 0, rss_kib BIGINT NOT NULL DEFAULT 0,
    vmm_cpu_pct DOUBLE PRECISION NOT NULL DEFAULT 0, balloon_mib BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL);

-- host_id: the host a job's command was sent to; only that host may answer it.
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL, vm_id TEXT NOT NULL,
    state TEXT NOT NULL, published BIGINT NOT NULL DEFAULT 0, attempts BIGINT NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '', created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    host_id TEXT NOT NULL DEFAULT '');

CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, ts BIGINT NOT NULL, kind TEXT NOT NULL, host_id TEXT NOT NULL,
    vm_id TEXT NOT NULL, job_id TEXT NOT NULL, detail TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY, ts BIGINT NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL,
    created_at BIGINT NOT NULL);

CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE INDEX IF NOT EXISTS jobs_unpublished ON jobs (published, state);
CREATE INDEX IF NOT EXISTS vms_owner ON vms (owner);
CREATE INDEX IF NOT EXISTS vms_by_age ON vms (owner, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS tokens_name ON tokens (name);
