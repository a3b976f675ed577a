//! Images: a kernel, an initrd, a command line and a disk on shared storage.

use serde::Serialize;
use sqlx::Row;

use super::{now_ms, Db, DbError};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Image {
    pub name: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub disk: String,
}

impl Db {
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
}
