//! Hosts' queue credentials: made when a host is added, made anew on request (a lost or leaked
//! credentials file), and the NATS users rewritten and reloaded in one place. The plaintext
//! password exists only in the host's credentials file (0600, in vimd's 0700 state directory);
//! the database and the NATS configuration hold its bcrypt hash.

use std::path::PathBuf;

use thiserror::Error;

use crate::server::Vimd;

#[derive(Debug, Error)]
pub enum HostError {
    #[error("host {0} already exists")]
    Exists(String),
    #[error("host {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<crate::db::DbError> for HostError {
    fn from(e: crate::db::DbError) -> Self {
        HostError::Other(e.into())
    }
}

/// What a host's agent needs to connect.
pub struct Credentials {
    pub user: String,
    pub file: PathBuf,
}

/// The NATS user name of a host.
pub fn nats_user(host_id: &str) -> String {
    format!("host-{host_id}")
}

/// Adds host `id` (checked by the caller) and issues its credentials.
pub async fn add(v: &Vimd, id: &str) -> Result<Credentials, HostError> {
    let password = crate::auth::random_secret();
    let hash = hash(&password).await?;
    match v.db.add_host(id, &nats_user(id), &hash).await {
        Ok(()) => {}
        Err(crate::db::DbError::Conflict(_)) => return Err(HostError::Exists(id.into())),
        Err(e) => return Err(e.into()),
    }
    v.liveness.register(id);
    publish_users(v, id).await?;
    Ok(write_credentials(v, id, &password).await?)
}

/// Issues host `id` a new password; the old one stops working when the server reloads.
pub async fn reissue(v: &Vimd, id: &str) -> Result<Credentials, HostError> {
    let password = crate::auth::random_secret();
    let hash = hash(&password).await?;
    if !v.db.set_host_password_hash(id, &hash).await? {
        return Err(HostError::NotFound(id.into()));
    }
    publish_users(v, id).await?;
    Ok(write_credentials(v, id, &password).await?)
}

/// Removes host `id` (it must run no VM) and revokes its queue credentials: the NATS users are
/// rewritten without it and its command consumer is deleted.
pub async fn remove(v: &Vimd, id: &str) -> Result<(), HostError> {
    match v.db.remove_host(id).await {
        Ok(true) => {}
        Ok(false) => return Err(HostError::NotFound(id.into())),
        Err(crate::db::DbError::Conflict(m)) => return Err(HostError::Busy(m)),
        Err(e) => return Err(e.into()),
    }
    v.liveness.forget(id);
    rewrite_users(v).await?;
    if let Err(e) = crate::queue::delete_host_consumer(&v.js, id).await {
        tracing::warn!(host = id, error = %e, "cannot delete a removed host's command consumer");
    }
    Ok(())
}

async fn hash(password: &str) -> anyhow::Result<String> {
    let p = password.to_string();
    tokio::task::spawn_blocking(move || crate::auth::hash_password(&p)).await?
}

/// Rewrites the NATS users from the database and makes the server use them, then makes sure
/// the host's command consumer exists. One writer at a time: two hosts added at once would
/// otherwise each write a list the other is missing from.
async fn publish_users(v: &Vimd, id: &str) -> anyhow::Result<()> {
    rewrite_users(v).await?;
    crate::queue::declare_host_consumer(&v.js, id).await
}

/// Writes the NATS users from the database and has the server load them.
async fn rewrite_users(v: &Vimd) -> anyhow::Result<()> {
    let _one = v.users_lock.lock().await;
    let hosts = v.db.hosts().await?;
    if let Some(n) = &v.embedded {
        n.reload(&hosts)?;
    } else if let Some(f) = &v.accounts_file {
        f.write(&hosts)?;
    }
    Ok(())
}

async fn write_credentials(v: &Vimd, id: &str, password: &str) -> anyhow::Result<Credentials> {
    let dir = v.state_dir.join("hosts");
    let file = dir.join(format!("{id}.creds"));
    let user = nats_user(id);
    let text = serde_json::json!({"user": user, "password": password}).to_string();
    let f = file.clone();
    tokio::task::spawn_blocking(move || {
        crate::files::private_dir(&dir)?;
        crate::files::replace_private(&f, text.as_bytes())
    })
    .await??;
    Ok(Credentials { user, file })
}
