//! API tokens: only their hashes are stored, with a name and a role.

use sqlx::Row;

use super::{now_ms, Db, DbError};

impl Db {
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
}
