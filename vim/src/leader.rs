//! Which vimd leads (docs/ha.md). Any number of vimd processes can share one PostgreSQL database
//! and one NATS JetStream cluster: each serves the API and takes jobs and host events from the
//! shared queue. The work that must happen once — the heartbeat monitor, fencing and restart
//! decisions, the reconciler, housekeeping, auto-suspend, the balancer — is done by the leader
//! only. The leader is the vimd holding a PostgreSQL session-level advisory lock: PostgreSQL
//! releases it the moment the holder's session ends (a vimd killed, its connection closed), and
//! ends a session that stays idle past `idle_session_timeout` (a vimd cut off from the database),
//! so another vimd takes it within seconds. A leader that cannot confirm its session within
//! `CHECK_TIMEOUT` stops leading at once, before the database gives the lock to anyone else.
//! With SQLite there is one vimd, always the leader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

/// The advisory lock's key ("vimd" in ASCII).
const LOCK_KEY: i64 = 0x7669_6d64;
/// How often the leader confirms its session, and a standby asks for the lock.
const EVERY: Duration = Duration::from_secs(1);
/// A confirmation slower than this: the leader stops leading.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// PostgreSQL ends the leader's session after this long without a word from it (a leader cut
/// off from the database): longer than `CHECK_TIMEOUT`, so it has stopped leading by then.
const IDLE_SESSION_TIMEOUT: &str = "5s";

/// Whether this vimd leads.
#[derive(Debug)]
pub struct Leadership {
    leader: AtomicBool,
}

impl Leadership {
    /// A vimd alone (SQLite): it leads from the start.
    pub fn alone() -> Leadership {
        Leadership {
            leader: AtomicBool::new(true),
        }
    }

    /// A vimd that must win the lock first.
    pub fn contended() -> Leadership {
        Leadership {
            leader: AtomicBool::new(false),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    fn set(&self, leader: bool) {
        if self.leader.swap(leader, Ordering::SeqCst) != leader {
            if leader {
                tracing::warn!(
                    "this vimd is the leader now: it monitors hosts and fails them over"
                );
            } else {
                tracing::warn!("this vimd no longer leads: it serves the API and takes jobs only");
            }
        }
    }
}

/// Contends for leadership on PostgreSQL at `url` for as long as vimd runs.
pub fn run(leadership: Arc<Leadership>, url: String) {
    tokio::spawn(async move {
        let mut session: Option<sqlx::PgConnection> = None;
        loop {
            match session.as_mut() {
                None => match connect(&url).await {
                    Ok(c) => session = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach PostgreSQL to contend for leadership")
                    }
                },
                Some(c) => {
                    let step = if leadership.is_leader() {
                        tokio::time::timeout(
                            CHECK_TIMEOUT,
                            sqlx::query("SELECT 1").execute(&mut *c),
                        )
                        .await
                        .map(|r| r.map(|_| true))
                    } else {
                        tokio::time::timeout(
                            CHECK_TIMEOUT,
                            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                                .bind(LOCK_KEY)
                                .fetch_one(&mut *c),
                        )
                        .await
                    };
                    let lost = match step {
                        Ok(Ok(lead)) => {
                            leadership.set(lead);
                            None
                        }
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some("no answer in time".to_string()),
                    };
                    if let Some(why) = lost {
                        tracing::warn!(why, "lost the database session that holds leadership");
                        leadership.set(false);
                        session = None;
                    }
                }
            }
            tokio::time::sleep(EVERY).await;
        }
    });
}

async fn connect(url: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query(&format!(
        "SET idle_session_timeout = '{IDLE_SESSION_TIMEOUT}'"
    ))
    .execute(&mut c)
    .await?;
    Ok(c)
}
