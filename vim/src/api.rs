//! The REST/JSON API (axum). Every call is authenticated by a bearer token and written to the
//! audit log with its outcome, failed logins included. Long operations answer `202` with a job id.
//! Bodies are limited in size and parsed strictly (unknown fields are errors).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, Identity, Role};
use crate::db::{self, AuditEntry};
use crate::server::Vimd;

pub const MAX_BODY: usize = 64 * 1024;

/// An API error: status and message, as `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        match e {
            crate::db::DbError::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            e => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

/// A JSON body; a rejection keeps axum's status (400 syntax, 413 too large, 415 not JSON, 422
/// wrong shape) with its message.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError(e.status(), e.body_text()))
}

/// A query string, parsed strictly like bodies (unknown parameters are errors).
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError(e.status(), e.body_text()))
}

type St = State<Arc<Vimd>>;

/// Authenticates and audits: runs `f` as the caller, records who did what and how it ended.
async fn call<F, Fut>(
    v: &Arc<Vimd>,
    headers: &HeaderMap,
    action: &str,
    target: &str,
    f: F,
) -> Response
where
    F: FnOnce(Arc<Vimd>, Identity) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let token = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let who = match token {
        Some(t) => identify(v, &auth::hash_token(t)).await,
        None => None,
    };
    let Some(who) = who else {
        audit(
            v,
            "?",
            "login",
            action,
            "denied",
            "missing or unknown token",
        )
        .await;
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or unknown API token".into(),
        )
        .into_response();
    };
    let name = who.name.clone();
    let r = f(v.clone(), who).await;
    let (outcome, detail) = match &r {
        Ok(resp) => (resp.status().as_u16().to_string(), String::new()),
        Err(ApiError(st, m)) => (st.as_u16().to_string(), m.clone()),
    };
    audit(v, &name, action, target, &outcome, &detail).await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Who holds the token with this hash: from the cache, else from the database.
async fn identify(v: &Vimd, hash: &str) -> Option<Identity> {
    if let Some(who) = v.tokens.get(hash) {
        return Some(who);
    }
    let (name, role) = v.db.token(hash).await.ok()??;
    let who = Identity {
        name,
        role: Role::parse(&role)?,
    };
    v.tokens.put(hash, &who);
    Some(who)
}

async fn audit(v: &Vimd, who: &str, action: &str, target: &str, outcome: &str, detail: &str) {
    let e = AuditEntry {
        ts: db::now_ms(),
        who: who.into(),
        action: action.into(),
        target: target.into(),
        outcome: outcome.into(),
        detail: detail.into(),
    };
    if let Err(err) = v.audit.record(e).await {
        tracing::error!(error = %err, "cannot write the audit log");
    }
}

fn admin(who: &Identity) -> Result<(), ApiError> {
    if who.role == Role::Admin {
        Ok(())
    } else {
        Err(ApiError(StatusCode::FORBIDDEN, "admins only".into()))
    }
}

pub fn router(v: Arc<Vimd>) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .route("/hosts", get(list_hosts).post(add_host))
        .route("/images", post(add_image))
        .route("/tokens", post(add_token))
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/:id", get(show_vm).delete(delete_vm))
        .route("/vms/:id/start", post(start_vm))
        .route("/vms/:id/stop", post(stop_vm))
        .route("/vms/:id/console", get(console))
        .route("/jobs", get(list_jobs))
        .route("/jobs/:id", get(show_job))
        .route("/events", get(list_events))
        .route("/events/stream", get(stream_events))
        .route("/audit", get(list_audit))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(v)
}

fn ok(v: Value) -> Result<Response, ApiError> {
    Ok(Json(v).into_response())
}

fn accepted(v: Value) -> Result<Response, ApiError> {
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

async fn list_hosts(State(v): St, h: HeaderMap) -> Response {
    call(&v, &h, "hosts.list", "", |v, _| async move {
        ok(json!(v.db.hosts().await?))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddHost {
    id: String,
}

/// Names and ids go into paths and NATS subjects: 1-63 letters, digits, '-' or '_'.
fn check_name(what: &str, s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(bad(format!("{what}: 1-63 letters, digits, '-' or '_'")))
    }
}

async fn add_host(State(v): St, h: HeaderMap, b: Result<Json<AddHost>, JsonRejection>) -> Response {
    call(&v, &h, "hosts.add", "", |v, who| async move {
        admin(&who)?;
        let req = body(b)?;
        check_name("host id", &req.id)?;
        let password = auth::random_secret();
        let user = format!("host-{}", req.id);
        v.db.add_host(&req.id, &user, &password).await?;
        v.liveness.register(&req.id);
        if let Some(n) = &v.embedded {
            n.reload(&v.db.hosts().await?)?;
        } else if let Some(f) = &v.accounts_file {
            f.write(&v.db.hosts().await?)?;
        }
        // Right after a reload the account's JetStream may briefly answer "not found".
        let mut tries = 0;
        while let Err(e) = crate::queue::declare_host_consumer(&v.js, &req.id).await {
            tries += 1;
            if tries >= 50 {
                return Err(e.into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let creds_dir = v.state_dir.join("hosts");
        std::fs::create_dir_all(&creds_dir).map_err(anyhow::Error::from)?;
        let creds = creds_dir.join(format!("{}.creds", req.id));
        let text = json!({"user": user, "password": password}).to_string();
        write_private(&creds, &text).map_err(anyhow::Error::from)?;
        ok(json!({
            "host_id": req.id,
            "nats_url": v.nats_url,
            "credentials_file": creds,
        }))
    })
    .await
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddImage {
    name: String,
    kernel: String,
    #[serde(default)]
    initrd: String,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    disk: String,
}

/// Copies an image's files to shared storage (`SHARED/images/NAME/`).
async fn add_image(
    State(v): St,
    h: HeaderMap,
    b: Result<Json<AddImage>, JsonRejection>,
) -> Response {
    call(&v, &h, "images.add", "", |v, who| async move {
        admin(&who)?;
        let req = body(b)?;
        check_name("image name", &req.name)?;
        if req.kernel.is_empty() {
            return Err(bad("an image needs a kernel"));
        }
        if v.db.image(&req.name).await?.is_some() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("image {} already exists", req.name),
            ));
        }
        // Copied into a staging directory first: an image that fails half-way (a missing file)
        // or loses a race for its name leaves nothing behind and touches no other image.
        let images = v.shared_dir.join("images");
        let dir = images.join(&req.name);
        let staging = images.join(format!(".{}.{}", req.name, db::new_id()));
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(anyhow::Error::from)?;
        let staged = async {
            let mut paths = Vec::new();
            for (src, name) in [
                (&req.kernel, "kernel"),
                (&req.initrd, "initrd"),
                (&req.disk, "disk.img"),
            ] {
                if src.is_empty() {
                    paths.push(String::new());
                    continue;
                }
                tokio::fs::copy(src, staging.join(name))
                    .await
                    .map_err(|e| bad(format!("{src}: {e}")))?;
                paths.push(dir.join(name).display().to_string());
            }
            tokio::fs::rename(&staging, &dir).await.map_err(|e| {
                ApiError(
                    StatusCode::CONFLICT,
                    format!("image {}: {} exists ({e})", req.name, dir.display()),
                )
            })?;
            Ok::<_, ApiError>(paths)
        }
        .await;
        let paths = match staged {
            Ok(p) => p,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&staging).await;
                return Err(e);
            }
        };
        let img = db::Image {
            name: req.name.clone(),
            kernel: paths[0].clone(),
            initrd: paths[1].clone(),
            cmdline: req.cmdline,
            disk: paths[2].clone(),
        };
        if let Err(e) = v.db.add_image(&img).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e.into());
        }
        ok(json!(img))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddToken {
    name: String,
    role: Role,
}

async fn add_token(
    State(v): St,
    h: HeaderMap,
    b: Result<Json<AddToken>, JsonRejection>,
) -> Response {
    call(&v, &h, "tokens.add", "", |v, who| async move {
        admin(&who)?;
        let req = body(b)?;
        check_name("token name", &req.name)?;
        let t = auth::random_secret();
        v.db.add_token(&auth::hash_token(&t), &req.name, req.role.as_str())
            .await?;
        ok(json!({"name": req.name, "role": req.role, "token": t}))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmPage {
    #[serde(default)]
    limit: Option<i64>,
    /// The last VM id of the page before.
    #[serde(default)]
    after: Option<String>,
}

/// VMs oldest first, a page at a time (`limit`, default 1000; `after`: the last id seen).
async fn list_vms(
    State(v): St,
    h: HeaderMap,
    q: Result<Query<VmPage>, QueryRejection>,
) -> Response {
    call(&v, &h, "vms.list", "", |v, who| async move {
        let q = query(q)?;
        let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
        let after = match &q.after {
            // A VM deleted since the page before still marks the place.
            Some(id) => match v.db.vm(id).await? {
                Some(vm) if who.may_touch(&vm.owner) => Some(vm),
                _ => return Err(bad(format!("after: no VM {id} to continue from"))),
            },
            None => None,
        };
        ok(json!(
            v.db.vms(who.owner_filter(), after.as_ref(), limit).await?
        ))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVm {
    name: String,
    image: String,
    vcpus: u32,
    memory_mib: u64,
}

async fn create_vm(
    State(v): St,
    h: HeaderMap,
    b: Result<Json<CreateVm>, JsonRejection>,
) -> Response {
    call(&v, &h, "vms.create", "", |v, who| async move {
        let req = body(b)?;
        check_name("VM name", &req.name)?;
        if req.vcpus == 0 || req.vcpus > 254 {
            return Err(bad("vcpus must be 1 to 254"));
        }
        if req.memory_mib < 16 || req.memory_mib > 1 << 22 {
            return Err(bad("memory_mib must be 16 to 4194304"));
        }
        if v.db.image(&req.image).await?.is_none() {
            return Err(bad(format!("image {} does not exist", req.image)));
        }
        let now = db::now_ms();
        let vm = db::Vm {
            id: db::new_id(),
            name: req.name,
            owner: who.name.clone(),
            image: req.image,
            vcpus: i64::from(req.vcpus),
            memory_mib: req.memory_mib as i64,
            host_id: String::new(),
            state: "pending".into(),
            created_at: now,
            ..db::Vm::default()
        };
        let job = db::Job::new("create", &who.name, &vm.id);
        v.db.add_job(&job, Some(&vm)).await?;
        v.outbox.push(&job.id);
        accepted(json!({"job_id": job.id, "vm_id": vm.id}))
    })
    .await
}

async fn owned_vm(v: &Vimd, who: &Identity, id: &str) -> Result<db::Vm, ApiError> {
    match v.db.vm(id).await? {
        Some(vm) if vm.state != "deleted" && who.may_touch(&vm.owner) => Ok(vm),
        _ => Err(not_found(&format!("VM {id}"))),
    }
}

async fn show_vm(State(v): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    call(&v, &h, "vms.show", &id.clone(), |v, who| async move {
        ok(json!(owned_vm(&v, &who, &id).await?))
    })
    .await
}

async fn vm_job(v: Arc<Vimd>, h: HeaderMap, id: String, kind: &'static str) -> Response {
    call(
        &v,
        &h,
        &format!("vms.{kind}"),
        &id.clone(),
        |v, who| async move {
            let vm = owned_vm(&v, &who, &id).await?;
            let job = db::Job::new(kind, &who.name, &vm.id);
            v.db.add_job(&job, None).await?;
            v.outbox.push(&job.id);
            accepted(json!({"job_id": job.id, "vm_id": vm.id}))
        },
    )
    .await
}

async fn start_vm(State(v): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    vm_job(v, h, id, "start").await
}

async fn stop_vm(State(v): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    vm_job(v, h, id, "stop").await
}

async fn delete_vm(State(v): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    vm_job(v, h, id, "delete").await
}

/// The guest's serial log, which the agent writes on shared storage.
async fn console(State(v): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    call(&v, &h, "vms.console", &id.clone(), |v, who| async move {
        let vm = owned_vm(&v, &who, &id).await?;
        let path = v.vm_dir(&vm.id).join("console.log");
        let text = std::fs::read(&path).unwrap_or_default();
        Ok(String::from_utf8_lossy(&text).into_owned().into_response())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    since: Option<i64>,
}

async fn list_jobs(
    State(v): St,
    h: HeaderMap,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    call(&v, &h, "jobs.list", "", |v, who| async move {
        let q = query(q)?;
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        ok(json!(v.db.jobs(who.owner_filter(), limit).await?))
    })
    .await
}

async fn show_job(State(v): St, h: HeaderMap, Path(id): Path<String>) -> Response {
    call(&v, &h, "jobs.show", &id.clone(), |v, who| async move {
        match v.db.job(&id).await? {
            Some(j) if who.may_touch(&j.owner) => ok(json!(j)),
            _ => Err(not_found(&format!("job {id}"))),
        }
    })
    .await
}

async fn list_events(
    State(v): St,
    h: HeaderMap,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    call(&v, &h, "events.list", "", |v, who| async move {
        admin(&who)?;
        let q = query(q)?;
        let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
        ok(json!(v.db.events(q.since.unwrap_or(0), limit).await?))
    })
    .await
}

async fn stream_events(State(v): St, h: HeaderMap) -> Response {
    call(&v, &h, "events.stream", "", |v2, who| async move {
        admin(&who)?;
        let rx = v2.events.subscribe();
        let s: std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>> =
            Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(e) => {
                            let ev = SseEvent::default()
                                .event(e.kind.clone())
                                .data(json!(e).to_string());
                            return Some((Ok(ev), rx));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return None,
                    }
                }
            }));
        Ok(Sse::new(s).keep_alive(KeepAlive::default()).into_response())
    })
    .await
}

async fn list_audit(
    State(v): St,
    h: HeaderMap,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    call(&v, &h, "audit.list", "", |v, who| async move {
        admin(&who)?;
        let q = query(q)?;
        let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
        ok(json!(v.db.audit_log(limit).await?))
    })
    .await
}
