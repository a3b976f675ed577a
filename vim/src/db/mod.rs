//! The VIM's state, the source of truth: hosts, images, VMs, jobs, events, the audit log and API
//! tokens. One schema and one set of queries for SQLite (the embedded default, a file in the state
//! directory) and PostgreSQL (by URL): only types and SQL both share (TEXT, BIGINT, DOUBLE
//! PRECISION, `$n` placeholders). Most queries go through sqlx's `Any` driver; the hot reads (a
//! VM, a page of VMs, placement, the heartbeat path's host lookup) go through typed pools
//! ([`Reader`]), because `Any` copies every value of every row into its own representation first
//! (measured as most of `GET /vms`'s cost, issue 17).

mod audit;
mod cluster;
mod events;
mod hosts;
mod images;
mod jobs;
mod join;
mod scaling;
mod tokens;
mod usage;
mod vms;
mod webhooks;

pub use audit::AuditEntry;
pub use events::Event;
pub use hosts::{place_key, Host, HostState, PLACEMENT_SAMPLE};
pub use hosts::{HostChange, HostReport};
pub use images::Image;
pub use jobs::Job;
pub use jobs::{JobKind, JobState};
pub use join::JoinRefused;
pub use scaling::ScalingPolicy;
pub use usage::{PriceRow, UsageRecord, BILLED_STATES};
pub use vim_proto::{EventKind, VmState};
pub use vms::{HaPolicy, Vm};
pub use webhooks::Webhook;

use sqlx::any::AnyPoolOptions;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::AnyPool;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("database schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("audit log: {0}")]
    Audit(String),
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The database handle. Reads share a pool; writes go through `writer`, which for SQLite is one
/// connection: SQLite allows one writer at a time, and waiting for the pool is a fair async queue
/// while waiting on SQLite's lock is a sleep-and-retry loop (tens of ms of jitter under load).
/// PostgreSQL uses one pool for both.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    writer: AnyPool,
    /// The same database for the hot reads, typed ([`read!`]).
    reader: Reader,
    /// Where events the database writes itself (usage) are told, once committed.
    listeners: std::sync::Arc<std::sync::OnceLock<tokio::sync::broadcast::Sender<Event>>>,
}

/// How many heartbeat rows one transaction writes: a batch of 10,000 is split so other writers
/// (an API call's job or audit row) wait for one chunk, not for the whole batch. Small chunks
/// cost more commits but keep the wait short: with 10,000 hosts beating, 50 gave a POST p99 of
/// 33–38 ms where 250 gave 42–56 ms (`scripts/bench-vim.sh`).
const HEARTBEAT_CHUNK: usize = 50;

/// A typed read pool of the database's own backend.
#[derive(Clone)]
enum Reader {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$p` bound to the typed read pool: the same SQL and decoding (through
/// [`Cols`]), compiled once per backend.
macro_rules! read {
    ($db:expr, $p:ident => $body:expr) => {
        match &$db.reader {
            $crate::db::Reader::Sqlite($p) => $body,
            $crate::db::Reader::Postgres($p) => $body,
        }
    };
}
use read;

/// A value type every backend decodes: what the schema holds.
pub(crate) trait Column:
    Sized
    + for<'r> sqlx::Decode<'r, sqlx::Any>
    + sqlx::Type<sqlx::Any>
    + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
    + sqlx::Type<sqlx::Sqlite>
    + for<'r> sqlx::Decode<'r, sqlx::Postgres>
    + sqlx::Type<sqlx::Postgres>
{
}
impl Column for String {}
impl Column for i64 {}
impl Column for f64 {}

/// A row of any of the backends, so one decoding function serves the `Any` and the typed pools.
pub(crate) trait Cols {
    fn col<T: Column>(&self, name: &str) -> Result<T, sqlx::Error>;
}

macro_rules! cols {
    ($($row:ty),*) => {$(
        impl Cols for $row {
            fn col<T: Column>(&self, name: &str) -> Result<T, sqlx::Error> {
                sqlx::Row::try_get(self, name)
            }
        }
    )*};
}
cols!(
    sqlx::any::AnyRow,
    sqlx::sqlite::SqliteRow,
    sqlx::postgres::PgRow
);

/// A column holding one of the enums' names (`vim_proto::names!`), decoded.
fn named<T>(r: &impl Cols, col: &str) -> Result<T, sqlx::Error>
where
    T: std::str::FromStr<Err = vim_proto::UnknownName>,
{
    r.col::<String>(col)?
        .parse()
        .map_err(|e| sqlx::Error::ColumnDecode {
            index: col.into(),
            source: Box::new(e),
        })
}

/// `n` bind markers from `$first` on (`$1, $2, …`), for an `IN (…)` list.
fn marks(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bind markers of a batched statement, made in the order they appear in its text (and are
/// bound in): `?` on SQLite, `$N` cast to the column's type on PostgreSQL. SQLite takes `$N` as
/// a name and looks each one up among those before it when it parses a statement: a statement of
/// 500 VM rows (5,000 values) took 213 ms with `$N`, 21 ms with `?`.
pub(crate) struct Marks {
    sqlite: bool,
    n: usize,
}

impl Marks {
    /// The next marker, for a value of SQL type `ty`.
    fn next(&mut self, ty: &str) -> String {
        self.n += 1;
        if self.sqlite {
            "?".into()
        } else {
            format!("CAST(${} AS {ty})", self.n)
        }
    }

    /// `rows` rows of one marker per type of `types`, for a `WITH r(…) AS (VALUES …)` table:
    /// one statement writes a whole batch (both databases take `UPDATE … FROM` such a table).
    fn rows(&mut self, types: &[&str], rows: usize) -> String {
        (0..rows)
            .map(|_| {
                let row: Vec<String> = types.iter().map(|t| self.next(t)).collect();
                format!("({})", row.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `n` markers for an `IN (…)` list of text.
    fn list(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| self.next("TEXT"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Rows one batched statement writes at most: SQLite takes 32,766 bind values in a statement.
const BATCH_ROWS: usize = 1000;

impl Db {
    /// Markers for a new batched statement ([`Marks`]).
    fn marks(&self) -> Marks {
        Marks {
            sqlite: matches!(self.reader, Reader::Sqlite(_)),
            n: 0,
        }
    }

    /// Opens (creating a SQLite file if needed) and brings the schema up to date (`vim/migrations`).
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
        // Applied once each, in order, recorded in `_sqlx_migrations`; a database that has a
        // migration this build does not know was made by a newer vimd and is refused.
        sqlx::migrate!("./migrations")
            .run(&writer)
            .await
            .map_err(DbError::Migrate)?;
        let pool = if sqlite {
            connect(4).await?
        } else {
            writer.clone()
        };
        let reader = if sqlite {
            let opts: SqliteConnectOptions = url.parse()?;
            Reader::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(opts.busy_timeout(std::time::Duration::from_secs(5)))
                    .await?,
            )
        } else {
            Reader::Postgres(
                PgPoolOptions::new()
                    .max_connections(16)
                    .connect(&url)
                    .await?,
            )
        };
        let db = Db {
            pool,
            writer,
            reader,
            listeners: Default::default(),
        };
        db.key_unkeyed_hosts().await?;
        Ok(db)
    }

    /// Tells `to` the events the database writes inside other changes' transactions (usage),
    /// after they commit; set once.
    pub fn tell_events(&self, to: tokio::sync::broadcast::Sender<Event>) {
        let _ = self.listeners.set(to);
    }

    fn announce(&self, events: Vec<Event>) {
        for e in events {
            tracing::info!(
                kind = e.kind.as_str(),
                vm_id = e.vm_id,
                detail = e.detail,
                "event"
            );
            if let Some(l) = self.listeners.get() {
                let _ = l.send(e);
            }
        }
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

    /// A new VM of alice's, not placed yet.
    pub fn pending_vm() -> super::Vm {
        Vm {
            id: new_id(),
            name: "a".into(),
            owner: "alice".into(),
            image: "img".into(),
            vcpus: 1,
            memory_mib: 64,
            state: VmState::Pending,
            created_at: now_ms(),
            ..super::Vm::default()
        }
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
                "hosts",
                "images",
                "vms",
                "jobs",
                "events",
                "audit",
                "tokens",
                "cluster_settings",
                "auto_suspend_policies",
                "webhooks",
                "usage_records",
                "prices",
                "consumer_plans",
                "join_tokens",
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

    /// A database made before migrations (the same tables, no `_sqlx_migrations`) is adopted
    /// with its rows; opening twice applies nothing twice.
    #[tokio::test]
    async fn a_database_from_before_migrations_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}?mode=rwc", dir.path().join("old.db").display());
        sqlx::any::install_default_drivers();
        let old = AnyPoolOptions::new().connect(&url).await.unwrap();
        let ddl: String = include_str!("../../migrations/0001_initial.sql")
            .lines()
            .filter(|l| !l.starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for stmt in ddl.split(';').filter(|s| s.contains("CREATE")) {
            sqlx::query(stmt).execute(&old).await.unwrap();
        }
        sqlx::query(
            "INSERT INTO hosts (id, state, nats_user, nats_password, created_at)
             VALUES ('h1', 'reachable', 'u', 'p', 1)",
        )
        .execute(&old)
        .await
        .unwrap();
        old.close().await;
        for _ in 0..2 {
            let db = Db::open(&url).await.unwrap();
            let hosts = db.hosts().await.unwrap();
            assert_eq!(hosts.len(), 1);
            assert_eq!(hosts[0].state, HostState::Reachable);
        }
    }
}
