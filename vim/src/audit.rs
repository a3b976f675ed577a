//! The audit log's writer: group commit. Every API call's entry must be in the database before
//! the call answers, but one transaction per entry makes each call wait for its own disk flush
//! (and for every other writer). Calls hand their entries to one task that commits whatever has
//! queued up in a single transaction and then tells each caller it is stored.

use tokio::sync::{mpsc, oneshot};

use crate::db::{AuditEntry, Db, DbError};

/// Entries written in one transaction at most.
const MAX_BATCH: usize = 512;

type Request = (AuditEntry, oneshot::Sender<Result<(), String>>);

#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Request>,
}

impl Audit {
    /// Starts the writer task on `db`.
    pub fn start(db: Db) -> Audit {
        let (tx, mut rx) = mpsc::channel::<Request>(4 * MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let (entries, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let r = db.add_audit(&entries).await.map_err(|e| e.to_string());
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
        });
        Audit { tx }
    }

    /// Stores one entry; returns once it is committed.
    pub async fn record(&self, e: AuditEntry) -> Result<(), DbError> {
        let (done, stored) = oneshot::channel();
        let gone = || DbError::Audit("the writer has stopped".into());
        self.tx.send((e, done)).await.map_err(|_| gone())?;
        stored.await.map_err(|_| gone())?.map_err(DbError::Audit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries sent together are all stored, each caller told once its own is.
    #[tokio::test]
    async fn concurrent_entries_all_stored() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&format!("sqlite:{}", dir.path().join("a.db").display()))
            .await
            .unwrap();
        let audit = Audit::start(db.clone());
        let calls: Vec<_> = (0..300)
            .map(|i| {
                let a = audit.clone();
                tokio::spawn(async move {
                    a.record(AuditEntry {
                        ts: i,
                        who: "alice".into(),
                        action: "vms.list".into(),
                        target: String::new(),
                        outcome: "200".into(),
                        detail: String::new(),
                    })
                    .await
                })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert_eq!(db.audit_log(1000).await.unwrap().len(), 300);
    }
}
