//! Webhooks: where events of chosen kinds are POSTed (`crate::webhooks` delivers them).

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now_ms, Db, DbError};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub owner: String,
    /// Every event (an admin's), or only the owner's VMs' (a consumer's).
    pub all_vms: bool,
    pub url: String,
    /// Event kinds (`VM_Restarted`, ...).
    pub events: Vec<String>,
    /// The HMAC key; shown once, when the webhook is added.
    #[serde(skip)]
    pub secret: String,
    pub created_at: i64,
}

fn webhook(r: &AnyRow) -> Result<Webhook, sqlx::Error> {
    let events: String = r.try_get("events")?;
    Ok(Webhook {
        id: r.try_get("id")?,
        owner: r.try_get("owner")?,
        all_vms: r.try_get::<i64, _>("all_vms")? != 0,
        url: r.try_get("url")?,
        events: events
            .split(',')
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
        secret: r.try_get("secret")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Db {
    pub async fn add_webhook(&self, w: &Webhook) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO webhooks (id, owner, url, events, secret, created_at, all_vms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&w.id)
        .bind(&w.owner)
        .bind(&w.url)
        .bind(w.events.join(","))
        .bind(&w.secret)
        .bind(now_ms())
        .bind(i64::from(w.all_vms))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Webhooks, all of them or `owner`'s.
    pub async fn webhooks(&self, owner: Option<&str>) -> Result<Vec<Webhook>, DbError> {
        let rows = match owner {
            Some(o) => {
                sqlx::query("SELECT * FROM webhooks WHERE owner = $1 ORDER BY created_at")
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM webhooks ORDER BY created_at")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.iter().map(webhook).collect::<Result<_, _>>()?)
    }

    /// Deletes webhook `id` if `owner` (any owner: None) has it; false if not.
    pub async fn delete_webhook(&self, id: &str, owner: Option<&str>) -> Result<bool, DbError> {
        let r = sqlx::query("DELETE FROM webhooks WHERE id = $1 AND ($2 = '' OR owner = $2)")
            .bind(id)
            .bind(owner.unwrap_or(""))
            .execute(&self.writer)
            .await?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::databases;

    #[tokio::test]
    async fn webhooks_are_kept_per_owner() {
        for (db, _dir) in databases().await {
            let w = Webhook {
                id: "w1".into(),
                owner: "alice".into(),
                all_vms: false,
                url: "http://127.0.0.1:1/h".into(),
                events: vec!["VM_Created".into(), "VM_Restarted".into()],
                secret: "s".into(),
                created_at: 0,
            };
            db.add_webhook(&w).await.unwrap();
            let got = db.webhooks(Some("alice")).await.unwrap();
            assert_eq!(got[0].events, w.events);
            assert_eq!(got[0].secret, "s");
            assert!(db.webhooks(Some("bob")).await.unwrap().is_empty());
            assert!(!db.delete_webhook("w1", Some("bob")).await.unwrap());
            assert!(db.delete_webhook("w1", Some("alice")).await.unwrap());
            assert!(db.webhooks(None).await.unwrap().is_empty());
        }
    }
}
