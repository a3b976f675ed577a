//! vimd's moving parts besides the HTTP API, one file each: the job workers (`jobs`: consume
//! `VIM_JOBS`, place VMs, send host commands), the event consumer (`events`: agents' answers and
//! VM events), heartbeat monitoring (`heartbeats`) and the upkeep tasks (`upkeep`: the outbox
//! reconciler, housekeeping). Here: what they all share. All state changes go to the database
//! first.

pub mod balancer;
mod events;
pub mod failover;
mod heartbeats;
mod jobs;
pub mod migrations;
mod scaling;
pub mod standby;
pub mod suspend;
mod upkeep;

pub use balancer::run_balancer;
pub use events::run_event_consumer;
pub use heartbeats::run_monitor;
pub use jobs::{run_job_workers, ResizeParams};
pub use suspend::run_auto_suspend;
pub use upkeep::{run_housekeeping, run_reconciler};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream;
use prost::Message;
use tokio::sync::broadcast;
use vim_proto::{host_command::Action, subjects as s, PROTOCOL_VERSION};

use crate::db::{self, Db, Event, EventKind, JobKind, JobState, VmState};
use crate::monitor::Liveness;
use crate::placement::Policy;
use crate::queue;

/// Heartbeat monitoring: how often agents beat, and how many misses make a host unreachable.
#[derive(Debug, Clone, Copy)]
pub struct Monitoring {
    pub interval: Duration,
    pub misses_for_unreachable: i64,
}

/// What every part of vimd shares.
pub struct Vimd {
    pub db: Db,
    /// Callers' tokens seen lately (`auth::TokenCache`).
    pub tokens: crate::auth::TokenCache,
    pub audit: crate::audit::Audit,
    /// Publishes committed jobs after the API has answered.
    pub outbox: crate::outbox::Outbox,
    pub js: jetstream::Context,
    pub nats: async_nats::Client,
    /// The URL agents are told to use.
    pub nats_url: String,
    /// The CA that verifies the NATS server agents connect to, its path and its PEM (read once
    /// at start; handed out by `host add`).
    pub nats_ca: Option<(PathBuf, String)>,
    pub embedded: Option<queue::EmbeddedNats>,
    /// With an external NATS: the users file its nodes include, if vimd keeps it.
    pub accounts_file: Option<queue::AccountsFile>,
    pub state_dir: PathBuf,
    pub shared_dir: PathBuf,
    pub policy: Policy,
    pub monitoring: Monitoring,
    /// A job not progressing for this long has its message sent again (see `run_reconciler`).
    pub job_resend: Duration,
    /// Leases, fencing and restarts of a failed host's VMs.
    pub failover: failover::Failover,
    pub liveness: Liveness,
    pub events: broadcast::Sender<Event>,
    /// Failed logins, for the limiter in the API.
    pub logins: crate::auth::LoginLimiter,
    /// One writer of the NATS users at a time (`hosts.rs`).
    pub users_lock: tokio::sync::Mutex<()>,
    /// Where `image add` may read files from (anywhere the caller names, without it).
    pub image_import_dir: Option<PathBuf>,
    /// The fleet-agent package joining hosts download.
    pub packages_dir: PathBuf,
    /// Whether the API is HTTPS (join scripts fetch the package the same way).
    pub api_https: bool,
    /// curl's pin of vimd's API key, for join commands (None: not pinned).
    pub api_pin: Option<String>,
    /// VMs whose disk is being copied (by a task of its own, not a job worker).
    pub copying: std::sync::Mutex<std::collections::HashSet<String>>,
    /// How long events and audit entries are kept.
    pub retention: Retention,
    /// Whether consumers may live-migrate their own VMs (admins always may).
    pub consumers_may_migrate: bool,
    /// Migrations each host sends and takes at once.
    pub migration_limits: migrations::MigrationLimits,
    /// Held while a migration is counted against the limits and started.
    pub migration_slots: tokio::sync::Mutex<()>,
    /// What `GET /metrics` reports.
    pub metrics: crate::metrics::Metrics,
    /// Whether this vimd does the work that must happen once (docs/ha.md).
    pub leadership: Arc<crate::leader::Leadership>,
}

/// How long the event log and the audit log keep their rows.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub events: Duration,
    pub audit: Duration,
}

impl Vimd {
    /// Whether this vimd leads: only the leader monitors hosts, fails them over and runs the
    /// periodic tasks.
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// A VM's directory on shared storage: its disk copy and console log. The id is checked
    /// first: an id is never a path of its own (`..`, `/etc`).
    pub fn vm_dir(&self, vm_id: &str) -> Result<PathBuf, vim_proto::BadId> {
        vim_proto::check_id("VM id", vm_id)?;
        Ok(self.shared_dir.join("vms").join(vm_id))
    }

    /// Records an event and tells the SSE listeners.
    pub async fn event(
        &self,
        kind: EventKind,
        host_id: &str,
        vm_id: &str,
        job_id: &str,
        detail: &str,
    ) {
        self.record_events(vec![Event::new(kind, host_id, vm_id, job_id, detail)])
            .await;
    }

    /// Records events (in as few transactions as the batch allows) and tells the SSE listeners.
    pub async fn record_events(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        for e in &events {
            tracing::info!(
                kind = e.kind.as_str(),
                host_id = e.host_id,
                vm_id = e.vm_id,
                job_id = e.job_id,
                detail = e.detail,
                "event"
            );
        }
        if let Err(err) = self.db.add_events(&events).await {
            tracing::error!(error = %err, n = events.len(), "cannot store events");
        }
        for e in events {
            let _ = self.events.send(e);
        }
    }

    /// Sends a job's command to its host. The message id is the job id, so a repeat inside the
    /// duplicate window is dropped by the server.
    async fn send_to_host(&self, host_id: &str, job_id: &str, action: Action) -> Result<()> {
        self.send_to_host_as(host_id, job_id, job_id, action).await
    }

    async fn send_to_host_as(
        &self,
        host_id: &str,
        job_id: &str,
        msg_id: &str,
        action: Action,
    ) -> Result<()> {
        let cmd = vim_proto::HostCommand {
            version: PROTOCOL_VERSION,
            job_id: job_id.into(),
            action: Some(action),
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", msg_id);
        self.js
            .publish_with_headers(s::host_commands(host_id), h, cmd.encode_to_vec().into())
            .await?
            .await?;
        Ok(())
    }

    /// Counts a job that has just ended (moved to `state`) for the metrics.
    fn job_ended(&self, job: &db::Job, state: JobState) {
        let secs = (db::now_ms() - job.created_at) as f64 / 1000.0;
        self.metrics
            .job_ended(job.kind.as_str(), state.as_str(), secs);
    }

    /// The metrics text, with the inventory and queue figures read now.
    pub async fn metrics_text(&self) -> Result<String> {
        let hosts = self.db.hosts().await?;
        let vms = self.db.live_vms().await?;
        self.metrics.set_inventory(&hosts, &vms, db::now_ms());
        self.metrics.set_leader(self.is_leader());
        for (stream, consumer) in [
            (s::JOB_STREAM, s::JOB_CONSUMER),
            (s::EVENT_STREAM, s::EVENT_CONSUMER),
        ] {
            match self
                .js
                .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                    consumer, stream,
                )
                .await
            {
                Ok(mut c) => {
                    if let Ok(info) = c.info().await {
                        self.metrics.set_pending(consumer, info.num_pending);
                    }
                }
                Err(e) => tracing::debug!(consumer, error = %e, "no consumer info for the metrics"),
            }
        }
        Ok(self.metrics.encode())
    }

    async fn fail_job(&self, job: &db::Job, why: &str) {
        if let Ok(true) = self
            .db
            .transition_job(
                &job.id,
                &[JobState::Pending, JobState::Running],
                JobState::Failed,
                why,
            )
            .await
        {
            self.job_ended(job, JobState::Failed);
            if job.kind == JobKind::Create {
                let _ = self
                    .db
                    .set_vm_state(&job.vm_id, VmState::Failed, 0, 0)
                    .await;
            }
            self.event(EventKind::JobFailed, "", &job.vm_id, &job.id, why)
                .await;
        }
    }
}
