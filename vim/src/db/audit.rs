//! The audit log: who did what to what, and how it ended.

use serde::Serialize;
use sqlx::Row;

use super::{new_id, Db, DbError};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEntry {
    pub ts: i64,
    pub who: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
}

impl Db {
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
