//! Cluster-wide settings, each a JSON text under a name (the balancer's: `balance`).

use sqlx::Row;

use super::{Db, DbError};

impl Db {
    /// The setting `name`, if it was ever set.
    pub async fn setting(&self, name: &str) -> Result<Option<String>, DbError> {
        let r = sqlx::query("SELECT value FROM cluster_settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some(r.try_get("value")?),
            None => None,
        })
    }

    pub async fn set_setting(&self, name: &str, value: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO cluster_settings (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::db::tests::databases;

    #[tokio::test]
    async fn a_setting_is_written_then_replaced() {
        for (db, _dir) in databases().await {
            assert_eq!(db.setting("balance").await.unwrap(), None);
            db.set_setting("balance", "{\"on\":true}").await.unwrap();
            db.set_setting("balance", "{\"on\":false}").await.unwrap();
            assert_eq!(
                db.setting("balance").await.unwrap().as_deref(),
                Some("{\"on\":false}")
            );
        }
    }
}
