//! The REST/JSON API (axum). Every call is authenticated by a bearer token and written to the
//! audit log with its outcome, failed logins included. Long operations answer `202` with a job id.
//! Bodies are limited in size and parsed strictly (unknown fields are errors).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{self, Identity, Role};
use crate::db::{self, AuditEntry};
use crate::server::Vimd;

mod accounting;
mod join;

pub use accounting::parse_time;

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

impl From<vim_proto::BadId> for ApiError {
    fn from(e: vim_proto::BadId) -> Self {
        bad(e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// A numeric parameter within its documented bounds, or 400 naming them.
fn in_range<T: PartialOrd + std::fmt::Display>(
    what: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, ApiError> {
    if v < lo || v > hi {
        return Err(bad(format!("{what} must be {lo} to {hi}, not {v}")));
    }
    Ok(v)
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

/// A JSON body; a rejection keeps axum's status (400 syntax, 413 too large, 415 not JSON, 422
/// wrong shape) with its message.
fn body<T>(b: Result<Body<T>, ApiError>) -> Result<T, ApiError> {
    b.map(|Body(v)| v)
}

/// A request body: a JSON object (not an array, which serde would take for a struct's fields
/// in order), of the handler's type. Taken as `Result<Body<T>, ApiError>`, so that the caller is
/// authenticated before its body is judged.
pub struct Body<T>(pub T);

#[axum::async_trait]
impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<Value>::from_request(req, state)
            .await
            .map_err(|e: JsonRejection| ApiError(e.status(), e.body_text()))?;
        if !v.is_object() {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the body must be a JSON object".into(),
            ));
        }
        serde_json::from_value(v).map(Body).map_err(|e| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            )
        })
    }
}

/// A query string, parsed strictly like bodies (unknown parameters are errors).
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError(e.status(), e.body_text()))
}

type St = State<Arc<Vimd>>;

/// What every handler needs of a request besides its body and path: the headers (the token)
/// and the peer's address (for the failed-login limiter).
pub struct Req {
    headers: HeaderMap,
    peer: Option<std::net::SocketAddr>,
}

#[axum::async_trait]
impl<S: Send + Sync> FromRequestParts<S> for Req {
    type Rejection = Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Req {
            headers: parts.headers.clone(),
            peer: crate::http::peer(parts),
        })
    }
}

/// The token of an `Authorization: Bearer …` header (the scheme in any case, RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = h.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authenticates and audits: runs `f` as the caller, records who did what and how it ended.
/// The call runs in a task of its own, so a client that goes away mid-request neither stops
/// the action half-way nor loses its audit row: what was done is always recorded.
async fn call<F, Fut>(v: &Arc<Vimd>, req: &Req, action: &str, target: &str, f: F) -> Response
where
    F: FnOnce(Arc<Vimd>, Identity) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
{
    let v = v.clone();
    let token = bearer(&req.headers).map(auth::hash_token);
    let peer = req.peer;
    let (action, target) = (action.to_string(), target.to_string());
    let task = tokio::spawn(async move {
        let who = match &token {
            Some(t) => identify(&v, t).await,
            None => None,
        };
        let Some(who) = who else {
            return denied(&v, peer, &action).await;
        };
        let name = who.name.clone();
        let r = f(v.clone(), who).await;
        let (outcome, detail) = match &r {
            Ok(resp) => (resp.status().as_u16().to_string(), String::new()),
            Err(ApiError(st, m)) => (st.as_u16().to_string(), m.clone()),
        };
        audit(&v, &name, &action, &target, &outcome, &detail).await;
        r.unwrap_or_else(IntoResponse::into_response)
    });
    task.await.unwrap_or_else(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the call failed: {e}"),
        )
        .into_response()
    })
}

/// A failed login: audited (up to the limiter's bounds; past them counted, and summarised by
/// `audit_login_summary`), answered 401, or 429 for a source that keeps failing.
async fn denied(v: &Vimd, peer: Option<std::net::SocketAddr>, action: &str) -> Response {
    let source = peer.map(|p| p.ip());
    match v.logins.failed(source) {
        auth::Failure::Audit => {
            let from = source.map_or_else(|| "?".into(), |ip| ip.to_string());
            let detail = format!("missing or unknown token, from {from}");
            audit(v, "?", "login", action, "denied", &detail).await;
        }
        auth::Failure::Count => {}
        auth::Failure::Refuse => {
            return ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins from this address; try again in a minute".into(),
            )
            .into_response();
        }
    }
    ApiError(
        StatusCode::UNAUTHORIZED,
        "missing or unknown API token".into(),
    )
    .into_response()
}

/// Writes one audit row per source for the failed logins counted but not audited one by one.
pub async fn audit_login_summary(v: &Vimd) {
    for (source, n) in v.logins.take_summary() {
        let detail = format!("{n} more failed logins from {source}, not audited one by one");
        audit(v, "?", "login", "", "denied", &detail).await;
    }
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
        .route("/hosts/:id", axum::routing::delete(join::remove_host))
        .route("/hosts/:id/credentials", post(reissue_host_credentials))
        .route("/join/:token", get(join::join))
        .route("/packages/:name", get(join::package))
        .route("/hosts/:id/drain", post(drain_host))
        .route("/hosts/:id/undrain", post(undrain_host))
        .route("/images", post(add_image))
        .route("/tokens", post(add_token))
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/:id", get(show_vm).delete(delete_vm))
        .route("/vms/:id/start", post(start_vm))
        .route("/vms/:id/stop", post(stop_vm))
        .route("/vms/:id/migrate", post(migrate_vm))
        .route("/vms/:id/resize", post(resize_vm))
        .route("/vms/:id/suspend", post(suspend_vm))
        .route("/vms/:id/resume", post(resume_vm))
        .route("/vms/:id/scaling", put(set_vm_scaling))
        .route("/consumers/:name/scaling", put(set_consumer_scaling))
        .route(
            "/consumers/:name/auto-suspend",
            put(set_consumer_auto_suspend),
        )
        .route("/scaling-policies", get(list_scaling))
        .route("/vms/:id/ha", put(set_ha))
        .route("/vms/:id/auto-suspend", put(set_auto_suspend))
        .route("/vms/:id/console", get(console))
        .route("/cluster/balance", get(show_balance).put(set_balance))
        .route("/cluster/balance/plan", get(plan_balance))
        .route("/cluster/status", get(cluster_status))
        .route("/metrics", get(metrics))
        .route("/prices", get(accounting::list_prices))
        .route("/prices/:plan", put(accounting::set_price))
        .route("/consumers/:name/plan", put(accounting::set_consumer_plan))
        .route("/bill", get(accounting::bill))
        .route("/sla/report", get(accounting::sla_report))
        .route("/webhooks", get(list_webhooks).post(add_webhook))
        .route("/webhooks/:id", axum::routing::delete(delete_webhook))
        .route("/jobs", get(list_jobs))
        .route("/jobs/:id", get(show_job))
        .route("/events", get(list_events))
        .route("/events/stream", get(stream_events))
        .route("/audit", get(list_audit))
        .merge(crate::ui::router())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(v)
}

/// 200 with `v` as JSON. Serialized straight from its type: `json!` first builds a tree of maps,
/// which cost `GET /vms` more than its query.
fn ok(v: impl Serialize) -> Result<Response, ApiError> {
    Ok(Json(v).into_response())
}

fn accepted(v: Value) -> Result<Response, ApiError> {
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

async fn list_hosts(State(v): St, h: Req) -> Response {
    call(&v, &h, "hosts.list", "", |v, who| async move {
        admin(&who)?;
        ok(json!(v.db.hosts().await?))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddHost {
    id: String,
    /// Also make a join token: the answer's `join` has it, for `vimctl host add --join` to
    /// print the one command the new host runs (docs/packages.md).
    #[serde(default)]
    join: bool,
    /// How long the join token lives (default 3600 s; without join, unused).
    #[serde(default)]
    join_ttl_s: Option<u64>,
    /// The shared storage's path on the new host (default vimd's own; without join, unused).
    #[serde(default)]
    shared_dir: Option<String>,
}

/// Names and ids go into paths and NATS subjects: one format (`vim_proto::check_id`).
fn check_name(what: &str, s: &str) -> Result<(), ApiError> {
    vim_proto::check_id(what, s).map_err(|e| bad(e.to_string()))
}

impl From<crate::hosts::HostError> for ApiError {
    fn from(e: crate::hosts::HostError) -> Self {
        use crate::hosts::HostError as E;
        match e {
            E::Exists(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            E::NotFound(id) => not_found(&format!("host {id}")),
            E::Busy(m) => ApiError(StatusCode::CONFLICT, m),
            E::Other(e) => e.into(),
        }
    }
}

fn credentials_answer(
    v: &Vimd,
    id: &str,
    c: crate::hosts::Credentials,
) -> Result<Response, ApiError> {
    ok(credentials_json(v, id, c))
}

fn credentials_json(v: &Vimd, id: &str, c: crate::hosts::Credentials) -> Value {
    // The CA is public: the agent's host gets it inline (to write beside its credentials) and
    // by path (for an agent on this machine).
    let (ca_file, ca_pem) = v.nats_ca.clone().unzip();
    json!({
        "host_id": id,
        "nats_url": v.nats_url,
        "nats_user": c.user,
        "credentials_file": c.file,
        "nats_ca_file": ca_file,
        "nats_ca_pem": ca_pem,
    })
}

async fn add_host(State(v): St, h: Req, b: Result<Body<AddHost>, ApiError>) -> Response {
    let target = b.as_ref().map(|Body(r)| r.id.clone()).unwrap_or_default();
    call(&v, &h, "hosts.add", &target, |v, who| async move {
        admin(&who)?;
        let req = body(b)?;
        check_name("host id", &req.id)?;
        let ttl = in_range(
            "join_ttl_s",
            req.join_ttl_s.unwrap_or(join::DEFAULT_JOIN_TTL_S),
            1,
            7 * 86_400,
        )?;
        if let Some(d) = &req.shared_dir {
            join::check_shared_dir(d)?;
        }
        let c = crate::hosts::add(&v, &req.id).await?;
        let mut answer = credentials_json(&v, &req.id, c);
        if req.join {
            answer["join"] = join::new_token(&v, &req.id, ttl, req.shared_dir).await?;
        }
        ok(answer)
    })
    .await
}

/// New queue credentials for a host (the old password stops working).
async fn reissue_host_credentials(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    call(
        &v,
        &h,
        "hosts.credentials",
        &id.clone(),
        |v, who| async move {
            admin(&who)?;
            check_name("host id", &id)?;
            let c = crate::hosts::reissue(&v, &id).await?;
            credentials_answer(&v, &id, c)
        },
    )
    .await
}

/// No new VMs on the host, and a migration job for each VM running there (placement chooses the
/// targets; each host sends and takes a bounded number at once). Answers the job ids.
async fn drain_host(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    call(&v, &h, "hosts.drain", &id.clone(), |v, who| async move {
        admin(&who)?;
        check_name("host id", &id)?;
        if !v.db.set_draining(&id, true).await? {
            return Err(not_found(&format!("host {id}")));
        }
        let mut jobs = Vec::new();
        let mut staying = Vec::new();
        for vm in v.db.vms_on(&id).await? {
            if vm.state != db::VmState::Running {
                // Only a running guest moves live; the caller hears which stay, and why.
                staying.push(json!({"vm_id": vm.id, "state": vm.state}));
                continue;
            }
            let params = crate::server::migrations::MigrateParams {
                downtime_ms: crate::server::migrations::DEFAULT_DOWNTIME_MS,
                reason: Some("drain".into()),
                ..Default::default()
            };
            jobs.push(queue_migration(&v, &who, &vm.id, &params).await?);
        }
        accepted(json!({"host_id": id, "jobs": jobs, "staying": staying}))
    })
    .await
}

/// The host takes new VMs again.
async fn undrain_host(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    call(&v, &h, "hosts.undrain", &id.clone(), |v, who| async move {
        admin(&who)?;
        check_name("host id", &id)?;
        if !v.db.set_draining(&id, false).await? {
            return Err(not_found(&format!("host {id}")));
        }
        ok(json!({"host_id": id, "draining": false}))
    })
    .await
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

/// Copies an image's files to shared storage (`SHARED/images/NAME/`). A source must be a
/// regular file (no symlink, FIFO or device: a FIFO used to hang the call forever), inside the
/// import directory when vimd has one; copies keep a disk's holes.
async fn add_image(State(v): St, h: Req, b: Result<Body<AddImage>, ApiError>) -> Response {
    let target = b.as_ref().map(|Body(r)| r.name.clone()).unwrap_or_default();
    call(&v, &h, "images.add", &target, |v, who| async move {
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
        let images = v.shared_dir.join("images");
        let dir = images.join(&req.name);
        let (kernel, initrd, disk) = (req.kernel.clone(), req.initrd.clone(), req.disk.clone());
        let import = v.image_import_dir.clone();
        let d = dir.clone();
        let paths = tokio::task::spawn_blocking(move || {
            stage_image(&images, &d, import.as_deref(), [&kernel, &initrd, &disk])
        })
        .await
        .map_err(anyhow::Error::from)??;
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

/// Copies an image's files into a staging directory first, then renames it to `dir`: an image
/// that fails half-way (a missing file) or loses a race for its name leaves nothing behind and
/// touches no other image. Returns the paths of kernel, initrd and disk (empty where none).
fn stage_image(
    images: &std::path::Path,
    dir: &std::path::Path,
    import: Option<&std::path::Path>,
    sources: [&String; 3],
) -> Result<Vec<String>, ApiError> {
    let staging = images.join(format!(".staging.{}", db::new_id()));
    std::fs::create_dir_all(&staging).map_err(anyhow::Error::from)?;
    let staged = (|| {
        let mut paths = Vec::new();
        for (src, name) in sources.into_iter().zip(["kernel", "initrd", "disk.img"]) {
            if src.is_empty() {
                paths.push(String::new());
                continue;
            }
            let file = open_import(src, import).map_err(|e| bad(format!("{src}: {e}")))?;
            crate::files::copy_sparse(&file, &staging.join(name))
                .map_err(|e| bad(format!("{src}: {e}")))?;
            paths.push(dir.join(name).display().to_string());
        }
        std::fs::rename(&staging, dir).map_err(|e| {
            ApiError(
                StatusCode::CONFLICT,
                format!("{} exists ({e})", dir.display()),
            )
        })?;
        Ok::<_, ApiError>(paths)
    })();
    if staged.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    staged
}

/// Opens an image source: an absolute path, inside `import` when there is one (symlinks in
/// the directories above are resolved first, so none leads out of it), a regular file.
fn open_import(src: &str, import: Option<&std::path::Path>) -> std::io::Result<std::fs::File> {
    use std::io::{Error, ErrorKind};
    let p = std::path::Path::new(src);
    if !p.is_absolute() {
        return Err(Error::new(ErrorKind::InvalidInput, "not an absolute path"));
    }
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(Error::new(ErrorKind::InvalidInput, "not a file path"));
    };
    let real = std::fs::canonicalize(parent)?.join(name);
    if let Some(root) = import {
        let root = std::fs::canonicalize(root)?;
        if !real.starts_with(&root) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("outside the image import directory {}", root.display()),
            ));
        }
    }
    crate::files::open_regular(&real)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddToken {
    name: String,
    role: Role,
}

async fn add_token(State(v): St, h: Req, b: Result<Body<AddToken>, ApiError>) -> Response {
    let target = b.as_ref().map(|Body(r)| r.name.clone()).unwrap_or_default();
    call(&v, &h, "tokens.add", &target, |v, who| async move {
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
async fn list_vms(State(v): St, h: Req, q: Result<Query<VmPage>, QueryRejection>) -> Response {
    call(&v, &h, "vms.list", "", |v, who| async move {
        let q = query(q)?;
        let limit = in_range("limit", q.limit.unwrap_or(1000), 1, 10_000)?;
        let after = match &q.after {
            // A VM deleted since the page before still marks the place.
            Some(id) => match v.db.vm(id).await? {
                Some(vm) if who.may_touch(&vm.owner) => Some(vm),
                _ => return Err(not_found(&format!("VM {id} (after)"))),
            },
            None => None,
        };
        ok(v.db.vms(who.owner_filter(), after.as_ref(), limit).await?)
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
    /// A NIC on its host's bridge (the default), with a MAC fixed for the VM's life.
    #[serde(default = "yes")]
    net: bool,
    /// What failover does when its host fails (default `restart`).
    #[serde(default)]
    ha: db::HaPolicy,
    /// Among a failed host's VMs, the higher restart first (default 0).
    #[serde(default)]
    ha_priority: i64,
    /// With `ha: resume`: seconds between checkpoints (default 5).
    #[serde(default)]
    checkpoint_s: Option<i64>,
    /// The most vCPUs it can be resized to while it runs (default 4 x vcpus, at most 254).
    #[serde(default)]
    max_vcpus: Option<u32>,
    /// The most memory it can be resized to while it runs, MiB (default: the consumer's scaling
    /// ceiling, else 4 x memory_mib; at most 1 TiB). It costs no host memory until plugged.
    #[serde(default)]
    max_memory_mib: Option<u64>,
    /// Its anti-affinity group: the caller's VMs of one group are kept on different hosts.
    #[serde(default)]
    group: Option<String>,
    /// Its availability target, percent of the time it is meant to run (default 99.95); a month
    /// below it is an `SLA_Violated` event.
    #[serde(default)]
    sla_target: Option<f64>,
}

/// The availability target of a VM that names none.
pub const DEFAULT_SLA_TARGET: f64 = 99.95;

/// The most memory a VM can grow to (the VMM's limit).
const MAX_MEMORY_MIB: u64 = 1 << 20;

/// The memory ceiling a VM gets: `want` brought within memory_mib..1 TiB and onto the 2 MiB
/// blocks memory is plugged in.
fn memory_ceiling(memory_mib: u64, want: u64) -> u64 {
    let max = want.clamp(memory_mib, MAX_MEMORY_MIB.max(memory_mib));
    memory_mib + ((max - memory_mib) & !1)
}

/// What a VM may be resized to at most, unless its creator says otherwise.
fn default_max_vcpus(vcpus: u32) -> u32 {
    (vcpus * 4).min(MAX_VCPUS)
}

/// The most vCPUs a VM can have (the VMM's limit: its MADT ids are one byte, 255 is broadcast).
const MAX_VCPUS: u32 = 254;

fn yes() -> bool {
    true
}

async fn create_vm(State(v): St, h: Req, b: Result<Body<CreateVm>, ApiError>) -> Response {
    call(&v, &h, "vms.create", "", |v, who| async move {
        let req = body(b)?;
        check_name("VM name", &req.name)?;
        if let Some(g) = &req.group {
            check_name("group", g)?;
        }
        if req.vcpus == 0 || req.vcpus > MAX_VCPUS {
            return Err(bad("vcpus must be 1 to 254"));
        }
        // A consumer with a scaling policy: its VMs may grow to the policy's ceiling.
        let policy_max =
            v.db.scaling_policy(&db::ScalingPolicy::consumer_scope(&who.name))
                .await?
                .filter(|p| p.enabled);
        let max_vcpus = req
            .max_vcpus
            .or(policy_max
                .as_ref()
                .map(|p| (p.max_vcpus as u32).clamp(req.vcpus, MAX_VCPUS)))
            .unwrap_or(default_max_vcpus(req.vcpus));
        if max_vcpus < req.vcpus || max_vcpus > MAX_VCPUS {
            return Err(bad(format!(
                "max_vcpus must be {} to 254 (at least vcpus)",
                req.vcpus
            )));
        }
        if req.memory_mib < 16 || req.memory_mib > 1 << 22 {
            return Err(bad("memory_mib must be 16 to 4194304"));
        }
        let max_memory_mib = match req.max_memory_mib {
            Some(m) if m < req.memory_mib || m > MAX_MEMORY_MIB.max(req.memory_mib) => {
                return Err(bad(format!(
                    "max_memory_mib must be {} to {MAX_MEMORY_MIB} (at least memory_mib)",
                    req.memory_mib
                )))
            }
            Some(m) if (m - req.memory_mib) % 2 != 0 => {
                return Err(bad(
                    "max_memory_mib must be memory_mib plus a whole number of 2 MiB blocks",
                ))
            }
            Some(m) => m,
            None => memory_ceiling(
                req.memory_mib,
                policy_max.map_or(req.memory_mib.saturating_mul(4), |p| {
                    p.max_memory_mib.max(0) as u64
                }),
            ),
        };
        if v.db.image(&req.image).await?.is_none() {
            return Err(not_found(&format!("image {}", req.image)));
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
            state: db::VmState::Pending,
            created_at: now,
            mac: if req.net {
                // Bytes 0-5 of a v4 UUID are random.
                let b = uuid::Uuid::new_v4().into_bytes();
                vmm_api::Mac::local([b[0], b[1], b[2], b[3], b[4], b[5]]).to_string()
            } else {
                String::new()
            },
            ha: req.ha,
            ha_priority: in_range("ha_priority", req.ha_priority, -1000, 1000)?,
            checkpoint_ms: checkpoint_ms(req.checkpoint_s, DEFAULT_CHECKPOINT_S * 1000)?,
            max_vcpus: i64::from(max_vcpus),
            max_memory_mib: max_memory_mib as i64,
            group: req.group.unwrap_or_default(),
            sla_target: in_range(
                "sla_target",
                req.sla_target.unwrap_or(DEFAULT_SLA_TARGET),
                50.0,
                100.0,
            )?,
            ..db::Vm::default()
        };
        let job = db::Job::new(db::JobKind::Create, &who.name, &vm.id);
        v.db.add_job(&job, Some(&vm)).await?;
        v.outbox.push(&job.id);
        accepted(json!({"job_id": job.id, "vm_id": vm.id}))
    })
    .await
}

async fn owned_vm(v: &Vimd, who: &Identity, id: &str) -> Result<db::Vm, ApiError> {
    match v.db.vm(id).await? {
        Some(vm) if vm.state != db::VmState::Deleted && who.may_touch(&vm.owner) => Ok(vm),
        _ => Err(not_found(&format!("VM {id}"))),
    }
}

/// Refuses (409) a change to a VM that is not in `state`, or that has a job under way: one
/// change at a time (a suspend racing a migration or a resize is refused, never both done).
async fn ready_for_change(v: &Vimd, vm: &db::Vm, state: db::VmState) -> Result<(), ApiError> {
    if vm.state != state {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("VM {} is {}, not {state}", vm.id, vm.state),
        ));
    }
    if v.db.unfinished_jobs_for(&vm.id).await? > 0 {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "VM {} has a job under way; try again once it is done",
                vm.id
            ),
        ));
    }
    Ok(())
}

async fn show_vm(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    call(&v, &h, "vms.show", &id.clone(), |v, who| async move {
        ok(owned_vm(&v, &who, &id).await?)
    })
    .await
}

async fn vm_job(v: Arc<Vimd>, h: Req, id: String, kind: db::JobKind) -> Response {
    call(
        &v,
        &h,
        &format!("vms.{kind}"),
        &id.clone(),
        move |v, who| async move {
            let vm = owned_vm(&v, &who, &id).await?;
            // A stop, start or delete racing the VIM's own move of the VM would be undone by it
            // (a failover restart answered after the stop runs the VM again): refused until the
            // move is over.
            if let Some(moving) = v.db.moving_job(&vm.id).await? {
                let what = if moving == db::JobKind::Restart {
                    "being restarted by failover"
                } else {
                    "being migrated"
                };
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("VM {} is {what}; try again once that is done", vm.id),
                ));
            }
            let job = db::Job::new(kind, &who.name, &vm.id);
            v.db.add_job(&job, None).await?;
            v.outbox.push(&job.id);
            accepted(json!({"job_id": job.id, "vm_id": vm.id}))
        },
    )
    .await
}

/// Starts a VM; a suspended one is resumed (its guest goes on where it was).
async fn start_vm(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    let suspended = matches!(
        v.db.vm(&id).await,
        Ok(Some(vm)) if vm.state == db::VmState::Suspended
    );
    if suspended {
        return resume_vm(State(v), h, Path(id), Ok(Body(ResumeVm::default()))).await;
    }
    vm_job(v, h, id, db::JobKind::Start).await
}

/// Suspends a running VM to shared storage (docs/suspend.md): a job, refused while another
/// job for the VM (a migration, a resize) is under way.
async fn suspend_vm(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    call(&v, &h, "vms.suspend", &id.clone(), |v, who| async move {
        let vm = owned_vm(&v, &who, &id).await?;
        ready_for_change(&v, &vm, db::VmState::Running).await?;
        let job = v
            .queue_job(db::JobKind::Suspend, &who.name, &vm.id, &json!({}))
            .await?;
        accepted(json!({"job_id": job.id, "vm_id": vm.id}))
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResumeVm {
    /// The host to resume on; placement chooses without it.
    #[serde(default)]
    to: Option<String>,
}

/// Resumes a suspended VM on any host with room, or on `to` (a job; it waits `pending_resume`
/// while no host has room).
async fn resume_vm(
    State(v): St,
    h: Req,
    Path(id): Path<String>,
    b: Result<Body<ResumeVm>, ApiError>,
) -> Response {
    call(&v, &h, "vms.resume", &id.clone(), |v, who| async move {
        let req = body(b)?;
        if let Some(to) = &req.to {
            check_name("host id", to)?;
        }
        let vm = owned_vm(&v, &who, &id).await?;
        ready_for_change(&v, &vm, db::VmState::Suspended).await?;
        let params = crate::server::suspend::ResumeParams { to: req.to };
        let job = v
            .queue_job(db::JobKind::Resume, &who.name, &vm.id, &params)
            .await?;
        accepted(json!({"job_id": job.id, "vm_id": vm.id}))
    })
    .await
}

async fn stop_vm(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    vm_job(v, h, id, db::JobKind::Stop).await
}

async fn delete_vm(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    vm_job(v, h, id, db::JobKind::Delete).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MigrateVm {
    /// The host to move to; placement chooses without it.
    #[serde(default)]
    to: Option<String>,
    /// The longest pause the guest should see.
    #[serde(default)]
    downtime_ms: Option<u64>,
}

/// Live-migrates a running VM to another host (a job; `docs/protocol.md`).
async fn migrate_vm(
    State(v): St,
    h: Req,
    Path(id): Path<String>,
    b: Result<Body<MigrateVm>, ApiError>,
) -> Response {
    call(&v, &h, "vms.migrate", &id.clone(), |v, who| async move {
        let req = body(b)?;
        if who.role != crate::auth::Role::Admin && !v.consumers_may_migrate {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "only admins may migrate VMs here (vimd --consumers-may-migrate)".into(),
            ));
        }
        if let Some(to) = &req.to {
            check_name("host id", to)?;
        }
        use crate::server::migrations as m;
        let downtime_ms = in_range(
            "downtime_ms",
            req.downtime_ms.unwrap_or(m::DEFAULT_DOWNTIME_MS),
            1,
            m::MAX_DOWNTIME_MS,
        )?;
        let vm = owned_vm(&v, &who, &id).await?;
        ready_for_change(&v, &vm, db::VmState::Running).await?;
        let params = m::MigrateParams {
            to: req.to,
            downtime_ms,
            ..Default::default()
        };
        accepted(queue_migration(&v, &who, &vm.id, &params).await?)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetHa {
    ha: db::HaPolicy,
    /// Unchanged when absent.
    priority: Option<i64>,
    /// Seconds between checkpoints with `resume`; unchanged when absent.
    checkpoint_s: Option<i64>,
}

/// Seconds between a `resume` VM's checkpoints, default 5.
const DEFAULT_CHECKPOINT_S: i64 = 5;

/// A checkpoint interval in seconds, checked, as milliseconds (`or` when absent).
fn checkpoint_ms(s: Option<i64>, or: i64) -> Result<i64, ApiError> {
    match s {
        Some(s) => Ok(in_range("checkpoint_s", s, 1, 3600)? * 1000),
        None => Ok(or),
    }
}

/// Sets a VM's HA policy (`restart`, `resume` or `off`): what failover does when its host fails.
/// A running VM's host is told of a change in how often to checkpoint it (a `set-checkpoints`
/// job).
async fn set_ha(
    State(v): St,
    h: Req,
    Path(id): Path<String>,
    b: Result<Body<SetHa>, ApiError>,
) -> Response {
    call(&v, &h, "vms.set_ha", &id.clone(), |v, who| async move {
        let req = body(b)?;
        let vm = owned_vm(&v, &who, &id).await?;
        let priority = match req.priority {
            Some(p) => in_range("priority", p, -1000, 1000)?,
            None => vm.ha_priority,
        };
        let every = checkpoint_ms(req.checkpoint_s, vm.checkpoint_ms)?;
        v.db.set_ha(&vm.id, req.ha, priority, every).await?;
        let now = owned_vm(&v, &who, &id).await?;
        // A running VM's host checkpoints it from now on as the new policy says.
        if now.state == db::VmState::Running
            && now.checkpoint_interval() != vm.checkpoint_interval()
        {
            v.queue_job(db::JobKind::SetCheckpoints, &who.name, &vm.id, &json!({}))
                .await?;
        }
        ok(json!(now))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAutoSuspend {
    /// CPU use per vCPU, in percent, at or below which the VM counts as idle.
    #[serde(default)]
    idle_pct: i64,
    /// How long it must stay idle to be suspended; 0: never.
    #[serde(default)]
    idle_s: i64,
    /// A VM's: follow its consumer's policy instead (the other fields are ignored).
    #[serde(default)]
    inherit: bool,
}

impl SetAutoSuspend {
    fn checked(&self) -> Result<(i64, i64), ApiError> {
        Ok((
            in_range("idle_pct", self.idle_pct, 0, 100)?,
            in_range("idle_s", self.idle_s, 0, 30 * 24 * 3600)?,
        ))
    }
}

/// Sets when a VM is suspended for being idle (docs/suspend.md): scale to zero, `vm start`
/// bringing it back. Its own setting wins over its consumer's; `inherit` goes back to that.
/// Sets a consumer's auto-suspend policy, for its VMs without one of their own (admin).
async fn set_consumer_auto_suspend(
    State(v): St,
    h: Req,
    Path(name): Path<String>,
    b: Result<Body<SetAutoSuspend>, ApiError>,
) -> Response {
    call(
        &v,
        &h,
        "consumers.auto_suspend",
        &name.clone(),
        |v, who| async move {
            admin(&who)?;
            check_name("consumer", &name)?;
            let req = body(b)?;
            if req.inherit {
                return Err(bad("inherit is for a VM's setting"));
            }
            let (pct, idle_s) = req.checked()?;
            v.db.set_consumer_auto_suspend(&name, pct, idle_s).await?;
            ok(json!({"consumer": name, "idle_pct": pct, "idle_s": idle_s}))
        },
    )
    .await
}

async fn set_auto_suspend(
    State(v): St,
    h: Req,
    Path(id): Path<String>,
    b: Result<Body<SetAutoSuspend>, ApiError>,
) -> Response {
    call(
        &v,
        &h,
        "vms.auto_suspend",
        &id.clone(),
        |v, who| async move {
            let req = body(b)?;
            let (pct, idle_s) = match req.inherit {
                true => (0, 0),
                // Stored -1: never, whatever the consumer's policy says.
                false => match req.checked()? {
                    (pct, 0) => (pct, -1),
                    set => set,
                },
            };
            let vm = owned_vm(&v, &who, &id).await?;
            v.db.set_auto_suspend(&vm.id, pct, idle_s).await?;
            ok(owned_vm(&v, &who, &id).await?)
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeVm {
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    memory_mib: Option<u64>,
}

/// Changes a running VM's vCPUs, from 1 to its `max_vcpus`, and its memory, up to its
/// `max_memory_mib` (docs/hotplug.md); growing needs room on its host for what is added. A
/// `resize` job: its host's answer (`VM_Resized`) holds what the guest took or gave back.
async fn resize_vm(
    State(v): St,
    h: Req,
    Path(id): Path<String>,
    b: Result<Body<ResizeVm>, ApiError>,
) -> Response {
    call(&v, &h, "vms.resize", &id.clone(), |v, who| async move {
        let req = body(b)?;
        if req.vcpus.is_none() && req.memory_mib.is_none() {
            return Err(bad("say what to change: vcpus, memory_mib or both"));
        }
        let vm = owned_vm(&v, &who, &id).await?;
        let ceiling = vm.vcpu_ceiling();
        let vcpus = req.vcpus.map_or(vm.vcpus, i64::from);
        if !(1..=ceiling).contains(&vcpus) {
            return Err(bad(format!(
                "vcpus must be 1 to {ceiling}, the VM's max_vcpus (set when it was created), not {vcpus}"
            )));
        }
        let mem_ceiling = vm.memory_ceiling();
        let memory = req.memory_mib.map_or(vm.memory_mib, |m| m.min(i64::MAX as u64) as i64);
        if !(16..=mem_ceiling).contains(&memory) {
            return Err(bad(format!(
                "memory_mib must be at most {mem_ceiling}, the VM's max_memory_mib (set when it \
                 was created), not {memory}"
            )));
        }
        ready_for_change(&v, &vm, db::VmState::Running).await?;
        if vcpus > vm.vcpus || memory > vm.memory_mib {
            let only = crate::placement::Among {
                only: Some(&vm.host_id),
                ..Default::default()
            };
            let (more_vcpus, more_mib) = ((vcpus - vm.vcpus).max(0), (memory - vm.memory_mib).max(0));
            let room = crate::placement::choose(&v.db, &v.policy, more_vcpus, more_mib, only)
                .await?;
            if let Err(why) = room {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("{why} (migrate the VM to a host with room first)"),
                ));
            }
        }
        let params = crate::server::ResizeParams {
            vcpus: vcpus as u32,
            memory_mib: (memory != vm.memory_mib).then_some(memory as u64),
            clamp_memory: false,
        };
        let job = v
            .queue_job(db::JobKind::Resize, &who.name, &vm.id, &params)
            .await?;
        accepted(json!({"job_id": job.id, "vm_id": vm.id}))
    })
    .await
}

/// A scaling policy as requests carry it: every field optional (the defaults of
/// docs/scaling.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetScalingPolicy {
    #[serde(default)]
    enabled: Option<bool>,
    up_pct: Option<i64>,
    up_window_s: Option<i64>,
    down_pct: Option<i64>,
    down_window_s: Option<i64>,
    min_vcpus: Option<i64>,
    min_memory_mib: Option<i64>,
    max_vcpus: Option<i64>,
    max_memory_mib: Option<i64>,
    cooldown_s: Option<i64>,
}

impl SetScalingPolicy {
    fn checked(self, scope: String) -> Result<db::ScalingPolicy, ApiError> {
        let d = db::ScalingPolicy::default();
        let p = db::ScalingPolicy {
            scope,
            enabled: self.enabled.unwrap_or(true),
            up_pct: in_range("up_pct", self.up_pct.unwrap_or(d.up_pct), 1, 100)?,
            up_window_s: in_range(
                "up_window_s",
                self.up_window_s.unwrap_or(d.up_window_s),
                1,
                3600,
            )?,
            down_pct: in_range("down_pct", self.down_pct.unwrap_or(d.down_pct), 0, 99)?,
            down_window_s: in_range(
                "down_window_s",
                self.down_window_s.unwrap_or(d.down_window_s),
                1,
                3600,
            )?,
            min_vcpus: in_range("min_vcpus", self.min_vcpus.unwrap_or(d.min_vcpus), 1, 254)?,
            min_memory_mib: in_range(
                "min_memory_mib",
                self.min_memory_mib.unwrap_or(d.min_memory_mib),
                16,
                1 << 22,
            )?,
            max_vcpus: in_range("max_vcpus", self.max_vcpus.unwrap_or(d.max_vcpus), 1, 254)?,
            max_memory_mib: in_range(
                "max_memory_mib",
                self.max_memory_mib.unwrap_or(d.max_memory_mib),
                16,
                1 << 22,
            )?,
            cooldown_s: in_range(
                "cooldown_s",
                self.cooldown_s.unwrap_or(d.cooldown_s),
                0,
                86_400,
            )?,
        };
        if p.down_pct >= p.up_pct {
            return Err(bad("down_pct must be below up_pct"));
        }
        if p.min_vcpus > p.max_vcpus || p.min_memory_mib > p.max_memory_mib {
            return Err(bad("the minimum must not be above the maximum"));
        }
        Ok(p)
    }
}

/// Sets a consumer's scaling policy (admins): it applies to every VM of the consumer without a
/// policy of its own. Each running VM's host is told the new thresholds.
async fn set_consumer_scaling(
    State(v): St,
    h: Req,
    Path(name): Path<String>,
    b: Result<Body<SetScalingPolicy>, ApiError>,
) -> Response {
    call(&v, &h, "scaling.set", &name.clone(), |v, who| async move {
        admin(&who)?;
        check_name("consumer", &name)?;
        let p = body(b)?.checked(db::ScalingPolicy::consumer_scope(&name))?;
        v.db.set_scaling_policy(&p).await?;
        let vms = v.db.vms(Some(&name), None, i64::MAX).await?;
        let jobs = tell_scaling(&v, &who, vms.iter().collect()).await?;
        ok(json!({"policy": p, "jobs": jobs}))
    })
    .await
}

/// Sets one VM's scaling policy (its owner or an admin); it wins over its owner's.
async fn set_vm_scaling(
    State(v): St,
    h: Req,
    Path(id): Path<String>,
    b: Result<Body<SetScalingPolicy>, ApiError>,
) -> Response {
    call(&v, &h, "vms.scaling", &id.clone(), |v, who| async move {
        let req = body(b)?;
        let vm = owned_vm(&v, &who, &id).await?;
        let p = req.checked(db::ScalingPolicy::vm_scope(&vm.id))?;
        v.db.set_scaling_policy(&p).await?;
        let jobs = tell_scaling(&v, &who, vec![&vm]).await?;
        ok(json!({"policy": p, "jobs": jobs}))
    })
    .await
}

/// A `set-scaling` job for each of `vms` that runs: its host watches the new thresholds.
async fn tell_scaling(
    v: &Vimd,
    who: &Identity,
    vms: Vec<&db::Vm>,
) -> Result<Vec<String>, ApiError> {
    let mut jobs = Vec::new();
    for vm in vms
        .into_iter()
        .filter(|vm| vm.state == db::VmState::Running)
    {
        let job = v
            .queue_job(db::JobKind::SetScaling, &who.name, &vm.id, &json!({}))
            .await?;
        jobs.push(job.id);
    }
    Ok(jobs)
}

/// The scaling policies: all of them for an admin; a consumer's own and its VMs' for it.
async fn list_scaling(State(v): St, h: Req) -> Response {
    call(&v, &h, "scaling.list", "", |v, who| async move {
        let all = v.db.scaling_policies().await?;
        let mine = if who.role == Role::Admin {
            all
        } else {
            let own: std::collections::HashSet<String> =
                v.db.vms(Some(&who.name), None, i64::MAX)
                    .await?
                    .into_iter()
                    .map(|vm| db::ScalingPolicy::vm_scope(&vm.id))
                    .collect();
            let me = db::ScalingPolicy::consumer_scope(&who.name);
            all.into_iter()
                .filter(|p| p.scope == me || own.contains(&p.scope))
                .collect()
        };
        ok(json!(mine))
    })
    .await
}

/// Writes a migrate job for VM `vm_id` and queues it; answers `{job_id, vm_id}`.
async fn queue_migration(
    v: &Vimd,
    who: &Identity,
    vm_id: &str,
    params: &crate::server::migrations::MigrateParams,
) -> Result<Value, ApiError> {
    let job = v
        .queue_job(db::JobKind::Migrate, &who.name, vm_id, params)
        .await?;
    Ok(json!({"job_id": job.id, "vm_id": vm_id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddWebhook {
    url: String,
    events: Vec<String>,
}

/// Adds a webhook (docs/webhooks.md): an admin's hears every event of its kinds, a consumer's
/// only its own VMs'. The answer has the signing secret, shown this once.
async fn add_webhook(State(v): St, h: Req, b: Result<Body<AddWebhook>, ApiError>) -> Response {
    call(&v, &h, "webhooks.add", "", |v, who| async move {
        let req = body(b)?;
        crate::webhooks::check_url(&req.url).map_err(bad)?;
        crate::webhooks::check_events(&req.events).map_err(bad)?;
        if v.db.webhooks(Some(&who.name)).await?.len() >= 100 {
            return Err(ApiError(
                StatusCode::CONFLICT,
                "at most 100 webhooks per caller".into(),
            ));
        }
        let w = db::Webhook {
            id: db::new_id(),
            owner: who.name.clone(),
            all_vms: who.role == Role::Admin,
            url: req.url,
            events: req.events,
            secret: auth::random_secret(),
            created_at: db::now_ms(),
        };
        v.db.add_webhook(&w).await?;
        let mut out = json!(w);
        out["secret"] = json!(w.secret);
        ok(out)
    })
    .await
}

async fn list_webhooks(State(v): St, h: Req) -> Response {
    call(&v, &h, "webhooks.list", "", |v, who| async move {
        ok(json!(v.db.webhooks(who.owner_filter()).await?))
    })
    .await
}

async fn delete_webhook(State(v): St, h: Req, Path(id): Path<String>) -> Response {
    call(
        &v,
        &h,
        "webhooks.delete",
        &id.clone(),
        |v, who| async move {
            check_name("webhook id", &id)?;
            if !v.db.delete_webhook(&id, who.owner_filter()).await? {
                return Err(not_found(&format!("webhook {id}")));
            }
            ok(json!({"deleted": id}))
        },
    )
    .await
}

/// Prometheus metrics, in the text exposition format (admin; docs/api.md).
async fn metrics(State(v): St, h: Req) -> Response {
    call(&v, &h, "metrics", "", |v, who| async move {
        admin(&who)?;
        let text = v.metrics_text().await?;
        let kind = "text/plain; version=0.0.4; charset=utf-8";
        Ok(([(axum::http::header::CONTENT_TYPE, kind)], text).into_response())
    })
    .await
}

/// A change to the balancer's settings: what is given replaces what was set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceChange {
    #[serde(default)]
    on: Option<bool>,
    #[serde(default)]
    threshold: Option<f64>,
    #[serde(default)]
    interval_s: Option<u64>,
    #[serde(default)]
    rounds: Option<u32>,
    #[serde(default)]
    min_gain: Option<f64>,
    #[serde(default)]
    settle_s: Option<u64>,
}

/// The balancer's settings, the imbalance now, and each host's load (docs/balance.md).
/// This vimd: whether it leads (docs/ha.md), and its process.
async fn cluster_status(State(v): St, h: Req) -> Response {
    call(&v, &h, "cluster.status", "", |v, who| async move {
        admin(&who)?;
        ok(json!({"leader": v.is_leader(), "pid": std::process::id()}))
    })
    .await
}

async fn show_balance(State(v): St, h: Req) -> Response {
    call(&v, &h, "cluster.balance.show", "", |v, who| async move {
        admin(&who)?;
        let s = v.balance_settings().await?;
        let model = v.balance_model(&s).await?;
        ok(json!({"settings": s, "imbalance": model.imbalance(), "hosts": model.hosts()}))
    })
    .await
}

async fn set_balance(State(v): St, h: Req, b: Result<Body<BalanceChange>, ApiError>) -> Response {
    call(&v, &h, "cluster.balance.set", "", |v, who| async move {
        admin(&who)?;
        let c = body(b)?;
        let old = v.balance_settings().await?;
        let s = crate::balance::Settings {
            on: c.on.unwrap_or(old.on),
            threshold: c.threshold.unwrap_or(old.threshold),
            interval_s: c.interval_s.unwrap_or(old.interval_s),
            rounds: c.rounds.unwrap_or(old.rounds),
            min_gain: c.min_gain.unwrap_or(old.min_gain),
            settle_s: c.settle_s.unwrap_or(old.settle_s),
        };
        s.check().map_err(bad)?;
        v.set_balance_settings(&s).await?;
        ok(json!(s))
    })
    .await
}

/// The dry run: the moves the balancer would make, one after another, from the load now
/// (whatever the setting of `on` and however long the imbalance has lasted); nothing changes.
async fn plan_balance(State(v): St, h: Req) -> Response {
    call(&v, &h, "cluster.balance.plan", "", |v, who| async move {
        admin(&who)?;
        let s = v.balance_settings().await?;
        let mut model = v.balance_model(&s).await?;
        let before = model.imbalance();
        let moves = model.plan(&s, crate::server::balancer::PLAN_MAX, false);
        ok(json!({
            "imbalance_before": before,
            "imbalance_after": model.imbalance(),
            "threshold": s.threshold,
            "moves": moves,
            "hosts_after": model.hosts(),
        }))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    /// How much of the end of the log, at most (default 1 MiB, at most 16 MiB).
    #[serde(default)]
    bytes: Option<u64>,
}

pub const CONSOLE_TAIL: u64 = 1 << 20;
pub const CONSOLE_TAIL_MAX: u64 = 16 << 20;

/// The end of the guest's serial log, which the agent writes on shared storage. The guest
/// decides how large it grows, so only a bounded tail is read, off the async workers.
async fn console(
    State(v): St,
    h: Req,
    Path(id): Path<String>,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
) -> Response {
    call(&v, &h, "vms.console", &id.clone(), |v, who| async move {
        let q = query(q)?;
        let max = in_range(
            "bytes",
            q.bytes.unwrap_or(CONSOLE_TAIL),
            1,
            CONSOLE_TAIL_MAX,
        )?;
        let vm = owned_vm(&v, &who, &id).await?;
        let path = v.vm_dir(&vm.id)?.join("console.log");
        let text = tokio::task::spawn_blocking(move || crate::files::tail(&path, max))
            .await
            .map_err(anyhow::Error::from)?
            .map_err(anyhow::Error::from)?;
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

async fn list_jobs(State(v): St, h: Req, q: Result<Query<ListQuery>, QueryRejection>) -> Response {
    call(&v, &h, "jobs.list", "", |v, who| async move {
        let q = query(q)?;
        let limit = in_range("limit", q.limit.unwrap_or(100), 1, 10_000)?;
        ok(json!(v.db.jobs(who.owner_filter(), limit).await?))
    })
    .await
}

async fn show_job(State(v): St, h: Req, Path(id): Path<String>) -> Response {
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
    h: Req,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    call(&v, &h, "events.list", "", |v, who| async move {
        admin(&who)?;
        let q = query(q)?;
        let limit = in_range("limit", q.limit.unwrap_or(1000), 1, 100_000)?;
        let since = match q.since {
            Some(t) => Some(in_range("since", t, 0, i64::MAX)?),
            None => None,
        };
        ok(json!(v.db.events(since, limit).await?))
    })
    .await
}

async fn stream_events(State(v): St, h: Req) -> Response {
    call(&v, &h, "events.stream", "", |v2, who| async move {
        admin(&who)?;
        let rx = v2.events.subscribe();
        let s: std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>> =
            Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(e) => {
                            let ev = SseEvent::default()
                                .event(e.kind.as_str())
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

async fn list_audit(State(v): St, h: Req, q: Result<Query<ListQuery>, QueryRejection>) -> Response {
    call(&v, &h, "audit.list", "", |v, who| async move {
        admin(&who)?;
        let q = query(q)?;
        let limit = in_range("limit", q.limit.unwrap_or(1000), 1, 100_000)?;
        ok(json!(v.db.audit_log(limit).await?))
    })
    .await
}
