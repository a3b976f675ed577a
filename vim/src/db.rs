//! The VIM's state, the source of truth: hosts, images, VMs, jobs, events, the audit log and API
//! tokens. One schema and one set of queries for SQLite (the embedded default, a file in the state
//! directory) and PostgreSQL (by URL), through sqlx's `Any` driver: only types and SQL both share
//! (TEXT, BIGINT, `$n` placeholders).

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("audit log: {0}")]
    Audit(String),
}

/// The schema, applied in order; each statement is idempotent.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS hosts (
        id TEXT PRIMARY KEY, hostname TEXT NOT NULL DEFAULT '', address TEXT NOT NULL DEFAULT '',
        cpu_cores BIGINT NOT NULL DEFAULT 0, memory_mib BIGINT NOT NULL DEFAULT 0,
        agent_version TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
        last_heartbeat BIGINT NOT NULL DEFAULT 0, missed BIGINT NOT NULL DEFAULT 0,
        nats_user TEXT NOT NULL, nats_password TEXT NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS images (
        name TEXT PRIMARY KEY, kernel TEXT NOT NULL, initrd TEXT NOT NULL, cmdline TEXT NOT NULL,
        disk TEXT NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS vms (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, owner TEXT NOT NULL, image TEXT NOT NULL,
        vcpus BIGINT NOT NULL, memory_mib BIGINT NOT NULL, host_id TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL, disk_path TEXT NOT NULL DEFAULT '', pid BIGINT NOT NULL DEFAULT 0,
        cpu_pct DOUBLE PRECISION NOT NULL DEFAULT 0, rss_kib BIGINT NOT NULL DEFAULT 0,
        vmm_cpu_pct DOUBLE PRECISION NOT NULL DEFAULT 0, balloon_mib BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL, vm_id TEXT NOT NULL,
        state TEXT NOT NULL, published BIGINT NOT NULL DEFAULT 0, attempts BIGINT NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT '', created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS events (
        id TEXT PRIMARY KEY, ts BIGINT NOT NULL, kind TEXT NOT NULL, host_id TEXT NOT NULL,
        vm_id TEXT NOT NULL, job_id TEXT NOT NULL, detail TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS audit (
        id TEXT PRIMARY KEY, ts BIGINT NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tokens (
        token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_ts ON events (ts)",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts)",
    "CREATE INDEX IF NOT EXISTS jobs_unpublished ON jobs (published, state)",
    "CREATE INDEX IF NOT EXISTS vms_owner ON vms (owner)",
    "CREATE INDEX IF NOT EXISTS vms_by_age ON vms (owner, created_at, id)",
    "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at)",
];

/// Columns added after a table was first released: added to databases made before (the error
/// a database that has one already gives is ignored).
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("vms", "vmm_cpu_pct DOUBLE PRECISION NOT NULL DEFAULT 0"),
    ("vms", "balloon_mib BIGINT NOT NULL DEFAULT 0"),
    // The host a job's command was sent to: only that host may answer it.
    ("jobs", "host_id TEXT NOT NULL DEFAULT ''"),
];

/// Constraints a database made by an older vimd may not meet yet (two tokens of one name):
/// applied where they can be, with a warning where they cannot.
const LATE_CONSTRAINTS: &[&str] =
    &["CREATE UNIQUE INDEX IF NOT EXISTS tokens_name ON tokens (name)"];

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Host {
    pub id: String,
    pub hostname: String,
    pub address: String,
    pub cpu_cores: i64,
    pub memory_mib: i64,
    pub agent_version: String,
    pub state: String,
    pub last_heartbeat: i64,
    pub missed: i64,
    #[serde(skip)]
    pub nats_user: String,
    /// A bcrypt hash (the plaintext is only in the credentials handed to the host).
    #[serde(skip)]
    pub nats_password_hash: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Image {
    pub name: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub disk: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub image: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub host_id: String,
    pub state: String,
    pub disk_path: String,
    pub pid: i64,
    /// The guest's CPU (its vCPU threads), % of one core.
    pub cpu_pct: f64,
    /// The VMM process's resident memory.
    pub rss_kib: i64,
    /// The VMM's own CPU (its other threads), % of one core.
    pub vmm_cpu_pct: f64,
    /// Memory the guest has handed back through its balloon.
    pub balloon_mib: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub owner: String,
    pub vm_id: String,
    pub state: String,
    pub published: bool,
    /// The host its command went to (empty before it was sent, or for jobs needing none).
    pub host_id: String,
    pub attempts: i64,
    pub error: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub id: String,
    pub ts: i64,
    pub kind: String,
    pub host_id: String,
    pub vm_id: String,
    pub job_id: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEntry {
    pub ts: i64,
    pub who: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
}

/// A host's state and missed-heartbeat count, as the monitor sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub host: String,
    pub state: String,
    pub missed: i64,
}

impl Event {
    pub fn new(kind: &str, host_id: &str, vm_id: &str, job_id: &str, detail: &str) -> Event {
        Event {
            id: new_id(),
            ts: now_ms(),
            kind: kind.into(),
            host_id: host_id.into(),
            vm_id: vm_id.into(),
            job_id: job_id.into(),
            detail: detail.into(),
        }
    }
}

impl Job {
    /// A new pending job, not yet published.
    pub fn new(kind: &str, owner: &str, vm_id: &str) -> Job {
        let now = now_ms();
        Job {
            id: new_id(),
            kind: kind.into(),
            owner: owner.into(),
            vm_id: vm_id.into(),
            state: "pending".into(),
            published: false,
            host_id: String::new(),
            attempts: 0,
            error: String::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

fn host(r: &AnyRow) -> Result<Host, sqlx::Error> {
    Ok(Host {
        id: r.try_get("id")?,
        hostname: r.try_get("hostname")?,
        address: r.try_get("address")?,
        cpu_cores: r.try_get("cpu_cores")?,
        memory_mib: r.try_get("memory_mib")?,
        agent_version: r.try_get("agent_version")?,
        state: r.try_get("state")?,
        last_heartbeat: r.try_get("last_heartbeat")?,
        missed: r.try_get("missed")?,
        nats_user: r.try_get("nats_user")?,
        nats_password_hash: r.try_get("nats_password")?,
    })
}

fn vm(r: &AnyRow) -> Result<Vm, sqlx::Error> {
    Ok(Vm {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        image: r.try_get("image")?,
        vcpus: r.try_get("vcpus")?,
        memory_mib: r.try_get("memory_mib")?,
        host_id: r.try_get("host_id")?,
        state: r.try_get("state")?,
        disk_path: r.try_get("disk_path")?,
        pid: r.try_get("pid")?,
        cpu_pct: r.try_get("cpu_pct")?,
        rss_kib: r.try_get("rss_kib")?,
        vmm_cpu_pct: r.try_get("vmm_cpu_pct")?,
        balloon_mib: r.try_get("balloon_mib")?,
        created_at: r.try_get("created_at")?,
    })
}

fn job(r: &AnyRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        owner: r.try_get("owner")?,
        vm_id: r.try_get("vm_id")?,
        state: r.try_get("state")?,
        published: r.try_get::<i64, _>("published")? != 0,
        host_id: r.try_get("host_id")?,
        attempts: r.try_get("attempts")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn event(r: &AnyRow) -> Result<Event, sqlx::Error> {
    Ok(Event {
        id: r.try_get("id")?,
        ts: r.try_get("ts")?,
        kind: r.try_get("kind")?,
        host_id: r.try_get("host_id")?,
        vm_id: r.try_get("vm_id")?,
        job_id: r.try_get("job_id")?,
        detail: r.try_get("detail")?,
    })
}

/// The database handle. Reads share a pool; writes go through `writer`, which for SQLite is one
/// connection: SQLite allows one writer at a time, and waiting for the pool is a fair async queue
/// while waiting on SQLite's lock is a sleep-and-retry loop (tens of ms of jitter under load).
/// PostgreSQL uses one pool for both.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    writer: AnyPool,
}

/// How many heartbeat rows one transaction writes: a batch of 10,000 is split so other writers
/// (an API call's job or audit row) wait for one chunk, not for the whole batch. Small chunks
/// cost more commits but keep the wait short: with 10,000 hosts beating, 50 gave a POST p99 of
/// 33–38 ms where 250 gave 42–56 ms (`scripts/bench-vim.sh`).
const HEARTBEAT_CHUNK: usize = 50;

/// `n` bind markers from `$first` on (`$1, $2, …`), for an `IN (…)` list.
fn marks(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Db {
    /// Opens (creating a SQLite file if needed) and applies the schema.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}?mode=rwc")
        } else {
            url.to_string()
        };
        let connect = |max: u32| {
            AnyPoolOptions::new()
                .max_connections(max)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if sqlite {
                            // Wait for another process's writer rather than fail at once; in
                            // WAL mode `synchronous=FULL` makes every commit durable on disk.
                            for p in ["PRAGMA busy_timeout=5000", "PRAGMA synchronous=FULL"] {
                                sqlx::query(p).execute(&mut *conn).await?;
                            }
                        }
                        Ok(())
                    })
                })
                .connect(&url)
        };
        let writer = connect(if sqlite { 1 } else { 16 }).await?;
        if sqlite {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&writer)
                .await?;
        }
        for s in SCHEMA {
            sqlx::query(s).execute(&writer).await?;
        }
        for (table, column) in ADDED_COLUMNS {
            let _ = sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN {column}"))
                .execute(&writer)
                .await;
        }
        for c in LATE_CONSTRAINTS {
            if let Err(e) = sqlx::query(c).execute(&writer).await {
                tracing::warn!(constraint = c, error = %e, "cannot apply a constraint to this database; fix its rows");
            }
        }
        let pool = if sqlite {
            connect(4).await?
        } else {
            writer.clone()
        };
        Ok(Db { pool, writer })
    }

    // Tokens.

    pub async fn add_token(&self, hash: &str, name: &str, role: &str) -> Result<(), DbError> {
        let r = sqlx::query(
            "INSERT INTO tokens (token_hash, name, role, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash)
        .bind(name)
        .bind(role)
        .bind(now_ms())
        .execute(&self.writer)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(DbError::Conflict(format!("a token named {name} exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The (name, role) a token hash belongs to.
    pub async fn token(&self, hash: &str) -> Result<Option<(String, String)>, DbError> {
        let r = sqlx::query("SELECT name, role FROM tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some((r.try_get("name")?, r.try_get("role")?)),
            None => None,
        })
    }

    pub async fn count_tokens(&self) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM tokens")
            .fetch_one(&self.pool)
            .await?;
        Ok(r.try_get("n")?)
    }

    // Hosts.

    /// A new host, with its NATS user and that user's password hash.
    pub async fn add_host(&self, id: &str, user: &str, password_hash: &str) -> Result<(), DbError> {
        let r = sqlx::query(
            "INSERT INTO hosts (id, state, nats_user, nats_password, created_at)
             VALUES ($1, 'registered', $2, $3, $4)",
        )
        .bind(id)
        .bind(user)
        .bind(password_hash)
        .bind(now_ms())
        .execute(&self.writer)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(DbError::Conflict(format!("host {id} already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a host's NATS password hash (new credentials, or a plaintext password stored by
    /// an older vimd).
    pub async fn set_host_password_hash(&self, id: &str, hash: &str) -> Result<bool, DbError> {
        let r = sqlx::query("UPDATE hosts SET nats_password = $1 WHERE id = $2")
            .bind(hash)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn hosts(&self) -> Result<Vec<Host>, DbError> {
        let rows = sqlx::query("SELECT * FROM hosts ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(host).collect::<Result<_, _>>()?)
    }

    /// The hosts among `ids` that exist (one query per few hundred ids).
    pub async fn hosts_among(&self, ids: &[String]) -> Result<Vec<Host>, DbError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(HEARTBEAT_CHUNK) {
            let sql = format!(
                "SELECT * FROM hosts WHERE id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push(host(&r)?);
            }
        }
        Ok(out)
    }

    /// Writes heartbeat reports (host facts, time, VM usage) in one transaction. Host states are
    /// not touched here: they change only through [`Db::set_host_states`].
    pub async fn record_heartbeats(
        &self,
        beats: &[(vim_proto::Heartbeat, i64)],
    ) -> Result<(), DbError> {
        for chunk in beats.chunks(HEARTBEAT_CHUNK) {
            self.record_heartbeat_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn record_heartbeat_chunk(
        &self,
        beats: &[(vim_proto::Heartbeat, i64)],
    ) -> Result<(), DbError> {
        let mut tx = self.writer.begin().await?;
        for (hb, at) in beats {
            sqlx::query(
                "UPDATE hosts SET hostname = $1, cpu_cores = $2, memory_mib = $3,
                 agent_version = $4, last_heartbeat = $5, address = $7 WHERE id = $6",
            )
            .bind(&hb.hostname)
            .bind(i64::from(hb.cpu_cores))
            .bind(hb.memory_mib as i64)
            .bind(&hb.agent_version)
            .bind(*at)
            .bind(&hb.host_id)
            .bind(&hb.address)
            .execute(&mut *tx)
            .await?;
            for v in &hb.vms {
                sqlx::query(
                    "UPDATE vms SET state = $1, pid = $2, cpu_pct = $3, rss_kib = $4,
                     vmm_cpu_pct = $7, balloon_mib = $8
                     WHERE id = $5 AND host_id = $6 AND state NOT IN ('deleted', 'pending')",
                )
                .bind(&v.state)
                .bind(i64::from(v.pid))
                .bind(v.cpu_pct)
                .bind(v.rss_kib as i64)
                .bind(&v.vm_id)
                .bind(&hb.host_id)
                .bind(v.vmm_cpu_pct)
                .bind(v.balloon_mib as i64)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Host state changes seen by the monitor, with the missed-heartbeat count each host has now;
    /// an unreachable host's VMs become `unknown`. Chunked like heartbeats.
    pub async fn set_host_states(&self, changes: &[HostState]) -> Result<(), DbError> {
        for chunk in changes.chunks(HEARTBEAT_CHUNK) {
            let mut tx = self.writer.begin().await?;
            for c in chunk {
                sqlx::query("UPDATE hosts SET state = $1, missed = $2 WHERE id = $3")
                    .bind(&c.state)
                    .bind(c.missed)
                    .bind(&c.host)
                    .execute(&mut *tx)
                    .await?;
                if c.state == "unreachable" {
                    sqlx::query(
                        "UPDATE vms SET state = 'unknown' WHERE host_id = $1 AND state <> 'deleted'",
                    )
                    .bind(&c.host)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        }
        Ok(())
    }

    // Images.

    pub async fn add_image(&self, i: &Image) -> Result<(), DbError> {
        let r = sqlx::query(
            "INSERT INTO images (name, kernel, initrd, cmdline, disk, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&i.name)
        .bind(&i.kernel)
        .bind(&i.initrd)
        .bind(&i.cmdline)
        .bind(&i.disk)
        .bind(now_ms())
        .execute(&self.writer)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(DbError::Conflict(
                format!("image {} already exists", i.name),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn image(&self, name: &str) -> Result<Option<Image>, DbError> {
        let r = sqlx::query("SELECT * FROM images WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some(Image {
                name: r.try_get("name")?,
                kernel: r.try_get("kernel")?,
                initrd: r.try_get("initrd")?,
                cmdline: r.try_get("cmdline")?,
                disk: r.try_get("disk")?,
            }),
            None => None,
        })
    }

    // VMs and jobs.

    /// Writes a VM (when `vm` is given) and the job that acts on it in one transaction: the job
    /// exists before anything is published (outbox).
    pub async fn add_job(&self, job: &Job, new_vm: Option<&Vm>) -> Result<(), DbError> {
        let mut tx = self.writer.begin().await?;
        if let Some(v) = new_vm {
            sqlx::query(
                "INSERT INTO vms (id, name, owner, image, vcpus, memory_mib, state, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&v.id)
            .bind(&v.name)
            .bind(&v.owner)
            .bind(&v.image)
            .bind(v.vcpus)
            .bind(v.memory_mib)
            .bind(&v.state)
            .bind(v.created_at)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO jobs (id, kind, owner, vm_id, state, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'pending', $5, $5)",
        )
        .bind(&job.id)
        .bind(&job.kind)
        .bind(&job.owner)
        .bind(&job.vm_id)
        .bind(job.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks jobs published (their messages are in `VIM_JOBS`), in as few statements as possible.
    pub async fn mark_published(&self, job_ids: &[String]) -> Result<(), DbError> {
        for chunk in job_ids.chunks(HEARTBEAT_CHUNK) {
            let sql = format!(
                "UPDATE jobs SET published = 1 WHERE id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&self.writer).await?;
        }
        Ok(())
    }

    /// Jobs written but not confirmed published, older than `age_ms`.
    pub async fn unpublished_jobs(&self, age_ms: i64) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE published = 0 AND state = 'pending' AND created_at < $1",
        )
        .bind(now_ms() - age_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// Jobs published and still in `state` (`pending`: NATS lost the message or no worker took
    /// it; `running`: no answer from the host) after `age_ms`; each is touched so it comes back
    /// only once per `age_ms`.
    pub async fn stale_jobs(&self, state: &str, age_ms: i64) -> Result<Vec<Job>, DbError> {
        let cutoff = now_ms() - age_ms;
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE published = 1 AND state = $1 AND updated_at < $2",
        )
        .bind(state)
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let jobs: Vec<Job> = rows.iter().map(job).collect::<Result<_, _>>()?;
        for chunk in jobs.chunks(HEARTBEAT_CHUNK) {
            // $1 and $2 are the time and state; the ids follow.
            let sql = format!(
                "UPDATE jobs SET updated_at = $1 WHERE state = $2 AND id IN ({})",
                marks(3, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(now_ms()).bind(state);
            for j in chunk {
                q = q.bind(&j.id);
            }
            q.execute(&self.writer).await?;
        }
        Ok(jobs)
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, DbError> {
        let r = sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(job).transpose()?)
    }

    pub async fn jobs(&self, owner: Option<&str>, limit: i64) -> Result<Vec<Job>, DbError> {
        let rows = match owner {
            Some(o) => {
                sqlx::query("SELECT * FROM jobs WHERE owner = $1 ORDER BY created_at DESC LIMIT $2")
                    .bind(o)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM jobs ORDER BY created_at DESC LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// Moves a job on; `from` guards against doing it twice (false: it was not in `from`).
    pub async fn transition_job(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        error: &str,
    ) -> Result<bool, DbError> {
        let placeholders: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 4)).collect();
        let sql = format!(
            "UPDATE jobs SET state = $1, error = $2, updated_at = $3, attempts = attempts + 1
             WHERE id = ${} AND state IN ({})",
            from.len() + 4,
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(to).bind(error).bind(now_ms());
        for f in from {
            q = q.bind(*f);
        }
        let r = q.bind(id).execute(&self.writer).await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn vm(&self, id: &str) -> Result<Option<Vm>, DbError> {
        let r = sqlx::query("SELECT * FROM vms WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(vm).transpose()?)
    }

    /// VMs not deleted, oldest first (then by id), at most `limit` of them, starting after the VM
    /// `after` (the last one of the page before: a cursor that stays right while VMs come and go).
    pub async fn vms(
        &self,
        owner: Option<&str>,
        after: Option<&Vm>,
        limit: i64,
    ) -> Result<Vec<Vm>, DbError> {
        let mut sql = String::from("SELECT * FROM vms WHERE state <> 'deleted'");
        let mut n = 0;
        let mut mark = || {
            n += 1;
            format!("${n}")
        };
        if owner.is_some() {
            sql += &format!(" AND owner = {}", mark());
        }
        if after.is_some() {
            let (a, b, c) = (mark(), mark(), mark());
            sql += &format!(" AND (created_at > {a} OR (created_at = {b} AND id > {c}))");
        }
        sql += &format!(" ORDER BY created_at, id LIMIT {}", mark());
        let mut q = sqlx::query(&sql);
        if let Some(o) = owner {
            q = q.bind(o);
        }
        if let Some(a) = after {
            q = q.bind(a.created_at).bind(a.created_at).bind(&a.id);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(vm).collect::<Result<_, _>>()?)
    }

    /// The reachable host with the most free memory that has room for `vcpus` and `memory_mib`
    /// under `p` (overcommit ratios, memory reserved for the host), counting the VMs placed on it
    /// that are not deleted.
    pub async fn roomiest_host(
        &self,
        p: &crate::placement::Policy,
        vcpus: i64,
        memory_mib: i64,
    ) -> Result<Option<String>, DbError> {
        let r = sqlx::query(
            "SELECT h.id,
                    (h.memory_mib - $1) * $2 - COALESCE(u.memory_mib, 0) AS free_mib
             FROM hosts h LEFT JOIN (
                 SELECT host_id, SUM(vcpus) AS vcpus, SUM(memory_mib) AS memory_mib FROM vms
                 WHERE host_id <> '' AND state <> 'deleted' GROUP BY host_id
             ) u ON u.host_id = h.id
             WHERE h.state = 'reachable'
               AND COALESCE(u.vcpus, 0) + $3 <= h.cpu_cores * $4
               AND $5 <= (h.memory_mib - $1) * $2 - COALESCE(u.memory_mib, 0)
             ORDER BY free_mib DESC, h.id LIMIT 1",
        )
        .bind(p.reserved_memory_mib)
        .bind(p.memory_ratio)
        .bind(vcpus)
        .bind(p.cpu_ratio)
        .bind(memory_mib)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match r {
            Some(r) => Some(r.try_get("id")?),
            None => None,
        })
    }

    pub async fn count_hosts(&self, state: &str) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM hosts WHERE state = $1")
            .bind(state)
            .fetch_one(&self.pool)
            .await?;
        Ok(r.try_get("n")?)
    }

    /// Places a VM on a host; false if it was deleted meanwhile (it is never placed then).
    pub async fn place_vm(&self, id: &str, host_id: &str, disk: &str) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE vms SET host_id = $1, disk_path = $2 WHERE id = $3 AND state <> 'deleted'",
        )
        .bind(host_id)
        .bind(disk)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A VM's state as its host reports it. States only move forward out of `deleted`: nothing
    /// a host or a late answer says brings a deleted VM back.
    pub async fn set_vm_state(&self, id: &str, state: &str, pid: i64) -> Result<bool, DbError> {
        let r =
            sqlx::query("UPDATE vms SET state = $1, pid = $2 WHERE id = $3 AND state <> 'deleted'")
                .bind(state)
                .bind(pid)
                .bind(id)
                .execute(&self.writer)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Deletes a VM that was never placed, unless it has been placed meanwhile (false: send
    /// the delete to its host instead).
    pub async fn delete_unplaced_vm(&self, id: &str) -> Result<bool, DbError> {
        let r =
            sqlx::query("UPDATE vms SET state = 'deleted', pid = 0 WHERE id = $1 AND host_id = ''")
                .bind(id)
                .execute(&self.writer)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records the host a job's command goes to, before it is sent (an answer may come back
    /// before the job is marked running).
    pub async fn assign_job_host(&self, id: &str, host_id: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE jobs SET host_id = $1 WHERE id = $2")
            .bind(host_id)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    // Events and audit.

    /// Stores events, a few hundred to a transaction.
    pub async fn add_events(&self, events: &[Event]) -> Result<(), DbError> {
        for chunk in events.chunks(HEARTBEAT_CHUNK) {
            let mut tx = self.writer.begin().await?;
            for e in chunk {
                sqlx::query(
                    "INSERT INTO events (id, ts, kind, host_id, vm_id, job_id, detail)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&e.id)
                .bind(e.ts)
                .bind(&e.kind)
                .bind(&e.host_id)
                .bind(&e.vm_id)
                .bind(&e.job_id)
                .bind(&e.detail)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Events oldest first: from `since` on, or without it the newest `limit` of them.
    pub async fn events(&self, since: Option<i64>, limit: i64) -> Result<Vec<Event>, DbError> {
        let rows = match since {
            Some(since) => {
                sqlx::query("SELECT * FROM events WHERE ts >= $1 ORDER BY ts, id LIMIT $2")
                    .bind(since)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM events ORDER BY ts DESC, id DESC LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut out: Vec<Event> = rows.iter().map(event).collect::<Result<_, _>>()?;
        if since.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// Drops events and audit entries older than their retention (ms since the epoch), a
    /// bounded batch at a time so other writers wait little; returns how many went.
    pub async fn expire(&self, events_before: i64, audit_before: i64) -> Result<u64, DbError> {
        let mut n = 0;
        for (table, before) in [("events", events_before), ("audit", audit_before)] {
            loop {
                let sql = format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE ts < $1 LIMIT 5000)"
                );
                let r = sqlx::query(&sql).bind(before).execute(&self.writer).await?;
                n += r.rows_affected();
                if r.rows_affected() < 5000 {
                    break;
                }
            }
        }
        Ok(n)
    }

    /// Stores audit entries in one transaction (see `audit.rs` for why together).
    pub async fn add_audit(&self, entries: &[AuditEntry]) -> Result<(), DbError> {
        let mut tx = self.writer.begin().await?;
        for a in entries {
            sqlx::query(
                "INSERT INTO audit (id, ts, who, action, target, outcome, detail)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(new_id())
            .bind(a.ts)
            .bind(&a.who)
            .bind(&a.action)
            .bind(&a.target)
            .bind(&a.outcome)
            .bind(&a.detail)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, DbError> {
        let rows = sqlx::query("SELECT * FROM audit ORDER BY ts DESC, id LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    ts: r.try_get("ts")?,
                    who: r.try_get("who")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    outcome: r.try_get("outcome")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a test database needs kept alive: SQLite's directory, or the lock that keeps tests
    /// running in parallel off the one PostgreSQL database.
    #[allow(dead_code)]
    pub enum Keep {
        Dir(tempfile::TempDir),
        Lock(tokio::sync::MutexGuard<'static, ()>),
    }

    static POSTGRES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// The database tests run on SQLite here, and on PostgreSQL too when VIM_TEST_DATABASE_URL
    /// names one (scripts/test.sh starts one), emptied first.
    pub async fn databases() -> Vec<(Db, Keep)> {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("vim.db").display());
        let mut out = vec![(Db::open(&url).await.unwrap(), Keep::Dir(dir))];
        if let Ok(pg) = std::env::var("VIM_TEST_DATABASE_URL") {
            let lock = POSTGRES.lock().await;
            let db = Db::open(&pg).await.unwrap();
            for t in [
                "hosts", "images", "vms", "jobs", "events", "audit", "tokens",
            ] {
                sqlx::query(&format!("DELETE FROM {t}"))
                    .execute(&db.pool)
                    .await
                    .unwrap();
            }
            out.push((db, Keep::Lock(lock)));
        }
        out
    }

    #[tokio::test]
    async fn jobs_move_once() {
        for (db, _dir) in databases().await {
            let vm = Vm {
                id: new_id(),
                name: "a".into(),
                owner: "alice".into(),
                image: "img".into(),
                vcpus: 1,
                memory_mib: 64,
                host_id: String::new(),
                state: "pending".into(),
                created_at: now_ms(),
                ..Vm::default()
            };
            let job = Job {
                created_at: now_ms() - 10_000,
                ..Job::new("create", "alice", &vm.id)
            };
            db.add_job(&job, Some(&vm)).await.unwrap();
            assert_eq!(db.unpublished_jobs(1000).await.unwrap().len(), 1);
            db.mark_published(std::slice::from_ref(&job.id))
                .await
                .unwrap();
            assert!(db.unpublished_jobs(1000).await.unwrap().is_empty());
            // Published 10 s ago and never taken: stale once, then not again until it ages.
            assert_eq!(db.stale_jobs("pending", 1000).await.unwrap().len(), 1);
            assert!(db.stale_jobs("pending", 1000).await.unwrap().is_empty());
            assert!(db.stale_jobs("running", 0).await.unwrap().is_empty());
            assert!(db
                .transition_job(&job.id, &["pending"], "running", "")
                .await
                .unwrap());
            assert!(
                !db.transition_job(&job.id, &["pending"], "running", "")
                    .await
                    .unwrap(),
                "a job moved twice"
            );
            // Deleted is final: no report, late answer or placement brings it back.
            assert!(db.delete_unplaced_vm(&vm.id).await.unwrap());
            assert!(!db.set_vm_state(&vm.id, "running", 7).await.unwrap());
            assert!(!db.place_vm(&vm.id, "h1", "").await.unwrap());
            assert_eq!(db.vm(&vm.id).await.unwrap().unwrap().state, "deleted");
            assert_eq!(db.vms(Some("alice"), None, 100).await.unwrap().len(), 0);
            assert_eq!(db.vms(Some("bob"), None, 100).await.unwrap().len(), 0);
            db.add_host("h1", "u", "p").await.unwrap();
            assert!(matches!(
                db.add_host("h1", "u", "p").await,
                Err(DbError::Conflict(_))
            ));
        }
    }

    /// Pages of a VM listing join up to the whole listing: oldest first, ties by id, nobody
    /// else's VMs and no deleted ones, each once.
    #[tokio::test]
    async fn vm_pages() {
        for (db, _dir) in databases().await {
            let mut ids = Vec::new();
            for i in 0..8 {
                let (owner, state) = match i {
                    3 => ("bob", "running"),
                    5 => ("alice", "deleted"),
                    _ => ("alice", "running"),
                };
                let vm = Vm {
                    id: new_id(),
                    name: format!("v{i}"),
                    owner: owner.into(),
                    state: state.into(),
                    // Pairs of VMs created in the same millisecond.
                    created_at: 1000 + i / 2,
                    ..Vm::default()
                };
                db.add_job(&Job::new("create", owner, &vm.id), Some(&vm))
                    .await
                    .unwrap();
                if owner == "alice" && state != "deleted" {
                    ids.push((vm.created_at, vm.id));
                }
            }
            ids.sort();
            let want: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
            let whole: Vec<String> = db
                .vms(Some("alice"), None, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.id)
                .collect();
            assert_eq!(whole, want);
            let mut paged: Vec<String> = Vec::new();
            let mut after: Option<Vm> = None;
            loop {
                let page = db.vms(Some("alice"), after.as_ref(), 2).await.unwrap();
                assert!(page.len() <= 2);
                paged.extend(page.iter().map(|v| v.id.clone()));
                match page.last() {
                    Some(last) if page.len() == 2 => after = Some(last.clone()),
                    _ => break,
                }
            }
            assert_eq!(paged, want);
            assert_eq!(db.vms(None, None, 100).await.unwrap().len(), want.len() + 1);
        }
    }

    /// Events and audit rows past their retention go, newer ones stay; a listing without
    /// `since` is the newest rows, oldest first.
    #[tokio::test]
    async fn old_rows_expire_and_listings_show_the_newest() {
        for (db, _dir) in databases().await {
            let events: Vec<Event> = (0..20)
                .map(|i| Event {
                    ts: 1000 + i,
                    ..Event::new("E", "h", "", "", &i.to_string())
                })
                .collect();
            db.add_events(&events).await.unwrap();
            let newest = db.events(None, 5).await.unwrap();
            let details: Vec<&str> = newest.iter().map(|e| e.detail.as_str()).collect();
            assert_eq!(details, ["15", "16", "17", "18", "19"]);
            assert_eq!(db.events(Some(1018), 100).await.unwrap().len(), 2);
            let audit: Vec<AuditEntry> = (0..10)
                .map(|i| AuditEntry {
                    ts: 1000 + i,
                    who: "w".into(),
                    action: "a".into(),
                    target: String::new(),
                    outcome: "200".into(),
                    detail: String::new(),
                })
                .collect();
            db.add_audit(&audit).await.unwrap();
            assert_eq!(db.expire(1010, 1005).await.unwrap(), 10 + 5);
            assert_eq!(db.events(Some(0), 100).await.unwrap().len(), 10);
            assert_eq!(db.audit_log(100).await.unwrap().len(), 5);
        }
    }

    /// The monitor's batched writes: more hosts than one chunk, looked up, marked and unmarked.
    #[tokio::test]
    async fn host_batches() {
        for (db, _dir) in databases().await {
            let n = HEARTBEAT_CHUNK * 2 + 7;
            let ids: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
            for id in &ids {
                db.add_host(id, "u", "p").await.unwrap();
            }
            let mut asked = ids.clone();
            asked.push("nobody".into());
            assert_eq!(db.hosts_among(&asked).await.unwrap().len(), n);
            let beats: Vec<(vim_proto::Heartbeat, i64)> = ids
                .iter()
                .map(|id| {
                    let hb = vim_proto::Heartbeat {
                        host_id: id.clone(),
                        cpu_cores: 8,
                        ..Default::default()
                    };
                    (hb, 42)
                })
                .collect();
            db.record_heartbeats(&beats).await.unwrap();
            let states: Vec<HostState> = ids
                .iter()
                .map(|id| HostState {
                    host: id.clone(),
                    state: "unreachable".into(),
                    missed: 3,
                })
                .collect();
            db.set_host_states(&states).await.unwrap();
            let events: Vec<Event> = ids
                .iter()
                .map(|id| Event::new("PS_Unreachable", id, "", "", ""))
                .collect();
            db.add_events(&events).await.unwrap();
            let hosts = db.hosts().await.unwrap();
            assert_eq!(hosts.len(), n);
            assert!(hosts.iter().all(|h| h.state == "unreachable"
                && h.missed == 3
                && h.cpu_cores == 8
                && h.last_heartbeat == 42));
            assert_eq!(db.events(Some(0), 10_000).await.unwrap().len(), n);
        }
    }
}
