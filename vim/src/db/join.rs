//! Host join tokens: single use, expiring; only their hashes are stored.

use sqlx::Row;

use super::{now_ms, Db, DbError};

/// Why a join token was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinRefused {
    Unknown,
    Used,
    Expired,
}

impl Db {
    pub async fn add_join_token(
        &self,
        token_hash: &str,
        host_id: &str,
        shared_dir: &str,
        expires_at: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, host_id, shared_dir, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(host_id)
        .bind(shared_dir)
        .bind(expires_at)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Spends a join token: its host and shared directory, once, before it expires.
    pub async fn take_join_token(
        &self,
        token_hash: &str,
    ) -> Result<Result<(String, String), JoinRefused>, DbError> {
        let now = now_ms();
        let taken = sqlx::query(
            "UPDATE join_tokens SET used_at = $1
             WHERE token_hash = $2 AND used_at = 0 AND expires_at > $1",
        )
        .bind(now)
        .bind(token_hash)
        .execute(&self.writer)
        .await?
        .rows_affected()
            == 1;
        let row = sqlx::query("SELECT * FROM join_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.writer)
            .await?;
        let Some(r) = row else {
            return Ok(Err(JoinRefused::Unknown));
        };
        if taken {
            return Ok(Ok((r.try_get("host_id")?, r.try_get("shared_dir")?)));
        }
        let used: i64 = r.try_get("used_at")?;
        Ok(Err(if used != 0 {
            JoinRefused::Used
        } else {
            JoinRefused::Expired
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::databases;

    #[tokio::test]
    async fn a_join_token_is_taken_once_and_not_after_it_expires() {
        for (db, _dir) in databases().await {
            db.add_join_token("a", "h1", "/srv", now_ms() + 60_000)
                .await
                .unwrap();
            db.add_join_token("b", "h2", "/srv", now_ms() - 1)
                .await
                .unwrap();
            assert_eq!(
                db.take_join_token("a").await.unwrap(),
                Ok(("h1".to_string(), "/srv".to_string()))
            );
            assert_eq!(
                db.take_join_token("a").await.unwrap(),
                Err(JoinRefused::Used)
            );
            assert_eq!(
                db.take_join_token("b").await.unwrap(),
                Err(JoinRefused::Expired)
            );
            assert_eq!(
                db.take_join_token("c").await.unwrap(),
                Err(JoinRefused::Unknown)
            );
        }
    }
}
