//! Hosts joining and leaving (docs/packages.md): join tokens made with `POST /hosts`, the join
//! script served for one (`GET /join/{token}`, no API token: the join token is the proof), the
//! package it downloads (`GET /packages/{name}`, public), and `DELETE /hosts/{id}`.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{admin, audit, call, check_name, ok, ApiError, Req, St};
use crate::db::{self, JoinRefused};
use crate::server::Vimd;

/// Join tokens live this long unless asked otherwise.
pub const DEFAULT_JOIN_TTL_S: u64 = 3600;

/// A new join token for `host`: what `vimctl host add --join` prints a command from.
pub(super) async fn new_token(
    v: &Vimd,
    host: &str,
    ttl_s: u64,
    shared_dir: Option<String>,
) -> Result<Value, ApiError> {
    let shared = match shared_dir {
        Some(d) => d,
        None => v.shared_dir.display().to_string(),
    };
    check_shared_dir(&shared)?;
    let token = crate::auth::random_secret();
    let expires_at = db::now_ms() + (ttl_s as i64) * 1000;
    v.db.add_join_token(&crate::auth::hash_token(&token), host, &shared, expires_at)
        .await?;
    Ok(json!({"token": token, "expires_at": expires_at, "pin": v.api_pin, "shared_dir": shared}))
}

/// A shared directory goes into the join script: an absolute path of plain characters.
pub(super) fn check_shared_dir(d: &str) -> Result<(), ApiError> {
    let plain = d
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if d.starts_with('/') && plain && d.len() <= 1024 {
        Ok(())
    } else {
        Err(super::bad(
            "shared_dir must be an absolute path of letters, digits, '.', '_', '-' and '/'",
        ))
    }
}

fn plain_text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The join script for a token, once. Refusals are `echo`ed to stderr by a script too, so that
/// `curl … | sh` says why rather than nothing (curl -f already fails on them, loudly).
pub(super) async fn join(State(v): St, headers: HeaderMap, Path(token): Path<String>) -> Response {
    let refuse = |status: StatusCode, why: &str| {
        plain_text(status, format!("echo 'join: {why}' >&2; exit 1\n"))
    };
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return refuse(StatusCode::NOT_FOUND, "no such join token");
    }
    let taken = match v.db.take_join_token(&crate::auth::hash_token(&token)).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot read join tokens");
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "vimd cannot read its database",
            );
        }
    };
    let (host, shared) = match taken {
        Ok(t) => t,
        Err(why) => {
            let (status, text) = match why {
                JoinRefused::Unknown => (StatusCode::NOT_FOUND, "no such join token"),
                JoinRefused::Used => (StatusCode::GONE, "this join token was used already"),
                JoinRefused::Expired => (StatusCode::GONE, "this join token has expired"),
            };
            audit(
                &v,
                "join-token",
                "hosts.join",
                "",
                &status.as_u16().to_string(),
                text,
            )
            .await;
            return refuse(status, text);
        }
    };
    match script(&v, &headers, &host, &shared).await {
        Ok(s) => {
            audit(&v, "join-token", "hosts.join", &host, "200", "").await;
            (
                [
                    (header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                s,
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(host, error = %e, "cannot make a join script");
            audit(&v, "join-token", "hosts.join", &host, "500", &e.to_string()).await;
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "vimd could not make the script",
            )
        }
    }
}

async fn script(v: &Vimd, headers: &HeaderMap, host: &str, shared: &str) -> anyhow::Result<String> {
    // The package comes from where the host reached vimd.
    let at = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .ok_or_else(|| anyhow::anyhow!("the request has no usable Host header"))?;
    let base = format!("{}://{at}", if v.api_https { "https" } else { "http" });
    // Credentials issued for this join: they exist in this answer and on the host only.
    let c = crate::hosts::reissue(v, host).await?;
    let creds = tokio::fs::read_to_string(&c.file).await?;
    let ca = v.nats_ca.as_ref().map(|(_, pem)| pem.as_str());
    Ok(crate::join::script(&crate::join::Join {
        host_id: host,
        base_url: &base,
        pin: v.api_pin.as_deref(),
        nats_url: &v.nats_url,
        credentials_json: &creds,
        nats_ca_pem: ca,
        shared_dir: shared,
    })?)
}

/// A package joining hosts install (public: it is the software, not a secret).
pub(super) async fn package(State(v): St, Path(name): Path<String>) -> Response {
    let ok_name = name.ends_with(".deb")
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b))
        && !name.starts_with('.');
    if !ok_name {
        return plain_text(StatusCode::NOT_FOUND, "no such package\n".into());
    }
    let path = v.packages_dir.join(&name);
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut f = crate::files::open_regular(&path)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes)?;
        Ok(bytes)
    })
    .await;
    match read {
        Ok(Ok(bytes)) => (
            [(
                header::CONTENT_TYPE,
                "application/vnd.debian.binary-package",
            )],
            bytes,
        )
            .into_response(),
        _ => plain_text(
            StatusCode::NOT_FOUND,
            format!("no package {name} in {}\n", v.packages_dir.display()),
        ),
    }
}

/// Removes a host that runs no VM and revokes its credentials.
pub(super) async fn remove_host(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    call(&v, &h, "hosts.remove", &id.clone(), |v, who| async move {
        admin(&who)?;
        check_name("host id", &id)?;
        crate::hosts::remove(&v, &id).await?;
        ok(json!({"host_id": id, "removed": true}))
    })
    .await
}
