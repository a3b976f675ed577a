//! vimd's moving parts besides the HTTP API: the job workers (consume `VIM_JOBS`, place VMs, send
//! host commands), the event consumer (agents' answers and VM events), heartbeat monitoring and the
//! outbox reconciler. All state changes go to the database first.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use prost::Message;
use tokio::sync::broadcast;
use vim_proto::{host_command::Action, subjects as s, Versioned, PROTOCOL_VERSION};

use crate::db::{self, Db, Event, EventKind, HostState, JobKind, JobState, VmState};
use crate::monitor::{Beat, Liveness};
use crate::outbox;
use crate::placement::{self, Policy};
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
    pub liveness: Liveness,
    pub events: broadcast::Sender<Event>,
    /// Failed logins, for the limiter in the API.
    pub logins: crate::auth::LoginLimiter,
    /// One writer of the NATS users at a time (`hosts.rs`).
    pub users_lock: tokio::sync::Mutex<()>,
    /// Where `image add` may read files from (anywhere the caller names, without it).
    pub image_import_dir: Option<PathBuf>,
    /// VMs whose disk is being copied (by a task of its own, not a job worker).
    pub copying: std::sync::Mutex<std::collections::HashSet<String>>,
    /// How long events and audit entries are kept.
    pub retention: Retention,
}

/// How long the event log and the audit log keep their rows.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub events: Duration,
    pub audit: Duration,
}

impl Vimd {
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
            if job.kind == JobKind::Create {
                let _ = self.db.set_vm_state(&job.vm_id, VmState::Failed, 0).await;
            }
            self.event(EventKind::JobFailed, "", &job.vm_id, &job.id, why)
                .await;
        }
    }

    /// One job, idempotently: a job already past `pending` is not done again (its host command,
    /// if any, was sent with the job id as message id and the agent dedups by job id too).
    async fn handle_job(self: &Arc<Self>, job_id: &str) -> Result<()> {
        let Some(job) = self.db.job(job_id).await? else {
            tracing::warn!(job_id, "job not in the database; dropped");
            return Ok(());
        };
        if job.state != JobState::Pending {
            return Ok(());
        }
        let Some(mut vm) = self.db.vm(&job.vm_id).await? else {
            self.fail_job(&job, "the VM does not exist").await;
            return Ok(());
        };
        // Deleted is final: a job queued behind the delete (a create racing it) does nothing.
        if vm.state == VmState::Deleted {
            self.fail_job(&job, "the VM has been deleted").await;
            return Ok(());
        }
        if job.kind == JobKind::Delete && vm.host_id.is_empty() {
            // Never placed (its create failed, or has not been handled yet): no host to ask.
            // The create, when it comes, finds the VM deleted and does nothing.
            if self.db.delete_unplaced_vm(&vm.id).await? {
                self.db
                    .transition_job(&job.id, &[JobState::Pending], JobState::Done, "")
                    .await?;
                self.event(EventKind::VmDeleted, "", &vm.id, &job.id, "never placed")
                    .await;
                return Ok(());
            }
            // Placed meanwhile: its host deletes it.
            let Some(placed) = self.db.vm(&job.vm_id).await? else {
                return Ok(());
            };
            vm = placed;
        }
        let host_id = if job.kind == JobKind::Create && vm.host_id.is_empty() {
            match placement::choose(&self.db, &self.policy, vm.vcpus, vm.memory_mib).await? {
                Ok(h) => h,
                Err(why) => {
                    self.fail_job(&job, &why).await;
                    return Ok(());
                }
            }
        } else {
            vm.host_id.clone()
        };
        if host_id.is_empty() {
            self.fail_job(&job, "the VM is on no host").await;
            return Ok(());
        }
        let action = match self.host_action(&job, &vm, &host_id).await? {
            Step::Send(a) => a,
            Step::Later => return Ok(()),
            Step::Refuse(why) => {
                self.fail_job(&job, &why).await;
                return Ok(());
            }
        };
        self.db.assign_job_host(&job.id, &host_id).await?;
        self.send_to_host(&host_id, &job.id, action).await?;
        self.db
            .transition_job(&job.id, &[JobState::Pending], JobState::Running, "")
            .await?;
        self.event(
            EventKind::JobSent,
            &host_id,
            &vm.id,
            &job.id,
            job.kind.as_str(),
        )
        .await;
        Ok(())
    }

    /// The host command that carries out `job` on `vm`, placed on `host_id`. Safe to call again
    /// for the same job (a resend): the disk copy is made once.
    async fn host_action(
        self: &Arc<Self>,
        job: &db::Job,
        vm: &db::Vm,
        host_id: &str,
    ) -> Result<Step> {
        let action = match job.kind {
            JobKind::Create => {
                let Some(image) = self.db.image(&vm.image).await? else {
                    return Ok(Step::Refuse(format!("image {} does not exist", vm.image)));
                };
                let Some(disk) = self.vm_disk(job, vm, &image).await? else {
                    return Ok(Step::Later);
                };
                if !self.db.place_vm(&vm.id, host_id, &disk).await? {
                    return Ok(Step::Refuse("the VM has been deleted".into()));
                }
                Action::Create(vim_proto::VmSpec {
                    vm_id: vm.id.clone(),
                    vcpus: vm.vcpus as u32,
                    memory_mib: vm.memory_mib as u64,
                    kernel: image.kernel,
                    initrd: image.initrd,
                    cmdline: image.cmdline,
                    disk,
                })
            }
            JobKind::Start => Action::Start(vm.id.clone()),
            JobKind::Stop => Action::Stop(vim_proto::StopVm {
                vm_id: vm.id.clone(),
                timeout_ms: 10_000,
            }),
            JobKind::Delete => Action::Delete(vm.id.clone()),
        };
        Ok(Step::Send(action))
    }

    /// The VM's own copy of its image's disk, on shared storage: `Some(path)` once it is whole
    /// (`""` for an image without a disk). Otherwise a task of its own copies it (keeping the
    /// image's holes), and sends the job back to the workers when done, so no worker waits for a copy
    /// of gigabytes while other tenants' jobs queue behind it; `None` meanwhile.
    async fn vm_disk(
        self: &Arc<Self>,
        job: &db::Job,
        vm: &db::Vm,
        image: &db::Image,
    ) -> Result<Option<String>> {
        if image.disk.is_empty() {
            return Ok(Some(String::new()));
        }
        let dir = self.vm_dir(&vm.id)?;
        let d = dir.join("disk.img");
        // Renamed into place last, so one that exists is whole.
        if tokio::fs::try_exists(&d).await? {
            return Ok(Some(d.display().to_string()));
        }
        if !crate::lock(&self.copying).insert(vm.id.clone()) {
            return Ok(None); // a copy is under way; it sends the job back when done
        }
        let (v, job, vm_id, src) = (self.clone(), job.clone(), vm.id.clone(), image.disk.clone());
        tokio::spawn(async move {
            let copied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::create_dir_all(&dir)?;
                let tmp = dir.join("disk.img.tmp");
                let src = crate::files::open_regular(std::path::Path::new(&src))?;
                crate::files::copy_sparse(&src, &tmp)?;
                std::fs::rename(&tmp, dir.join("disk.img"))
            })
            .await;
            crate::lock(&v.copying).remove(&vm_id);
            match copied {
                Ok(Ok(())) => {
                    // Back to the workers (under a new message id: the first is still in the
                    // duplicate window). If this publish is lost, the job is still pending and
                    // the reconciler publishes it again.
                    let ids = [(job.id.clone(), format!("{}-disk", job.id))];
                    if let Err(e) = outbox::publish(&v.js, &v.db, &ids).await {
                        tracing::warn!(job = job.id, error = %e, "job after its disk copy");
                    }
                }
                Ok(Err(e)) => {
                    v.fail_job(&job, &format!("cannot copy the image's disk: {e}"))
                        .await
                }
                Err(e) => v.fail_job(&job, &format!("disk copy: {e}")).await,
            }
        });
        Ok(None)
    }

    /// Sends a running job's host command again, under a fresh message id: the first copy may
    /// have been lost (nats-server killed before its store reached the disk). The agent answers
    /// a job it has done from its stored result, so a second copy never does the work twice.
    async fn resend(self: &Arc<Self>, job: &db::Job) -> Result<()> {
        let Some(vm) = self.db.vm(&job.vm_id).await? else {
            return Ok(());
        };
        let host = if job.host_id.is_empty() {
            vm.host_id.clone()
        } else {
            job.host_id.clone()
        };
        if host.is_empty() {
            return Ok(());
        }
        match self.host_action(job, &vm, &host).await? {
            Step::Send(action) => {
                let msg_id = format!("{}-{}", job.id, db::now_ms());
                self.send_to_host_as(&host, &job.id, &msg_id, action).await
            }
            Step::Later => Ok(()),
            Step::Refuse(why) => {
                self.fail_job(job, &why).await;
                Ok(())
            }
        }
    }

    /// An agent's answer or report, from host `sender` (the subject it came on, which NATS
    /// permissions make the publisher's own). Nothing in it is taken on trust: the job record
    /// says which VM, which host and which kind of answer is due, and an answer that does not
    /// match it, or a report about a VM that is not on the sender, is refused and audited.
    async fn handle_host_event(&self, sender: &str, ev: vim_proto::HostEvent) -> Result<()> {
        let checked = match self.check_host_event(sender, &ev).await? {
            Ok(c) => c,
            Err(why) => {
                self.refuse_host_event(sender, &ev, &why).await;
                return Ok(());
            }
        };
        if let Some(v) = &ev.vm {
            self.db
                .set_vm_state(&checked.vm_id, v.state(), i64::from(v.pid))
                .await?;
        }
        if let Some(job) = &checked.job {
            let (to, err) = if ev.ok {
                (JobState::Done, String::new())
            } else {
                (JobState::Failed, ev.error.clone())
            };
            let moved = self
                .db
                .transition_job(&job.id, &[JobState::Running, JobState::Pending], to, &err)
                .await?;
            if !moved {
                return Ok(()); // a redelivered answer
            }
            if !ev.ok && job.kind == JobKind::Create && ev.vm.is_none() {
                // Refused before the agent knew the VM (a bad spec): it will not run there.
                self.db
                    .set_vm_state(&checked.vm_id, VmState::Failed, 0)
                    .await?;
            }
            if ev.ok && job.kind == JobKind::Delete {
                // Its disk copy goes with it (the image's disk stays).
                let dir = self.vm_dir(&checked.vm_id)?;
                if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(vm = checked.vm_id, dir = %dir.display(), error = %e, "cannot remove a deleted VM's files");
                    }
                }
            }
        }
        let kind = ev.kind();
        let detail = if ev.ok { String::new() } else { ev.error };
        self.event(kind, sender, &checked.vm_id, &ev.job_id, &detail)
            .await;
        Ok(())
    }

    /// What a host event may touch, or why it is refused.
    async fn check_host_event(
        &self,
        sender: &str,
        ev: &vim_proto::HostEvent,
    ) -> Result<Result<CheckedEvent, String>> {
        if ev.host_id != sender {
            return Ok(Err(format!(
                "the event names host {:?} but came from {sender}",
                ev.host_id
            )));
        }
        // Numbers outside the enums decode as `Unspecified`: refused with the rest.
        if !ev.kind().from_agent() {
            return Ok(Err(format!(
                "event kind {} is not a host's to send",
                ev.kind
            )));
        }
        if let Some(r) = &ev.vm {
            if !r.state().reportable() {
                return Ok(Err(format!(
                    "VM state {} is not a host's to report",
                    r.state
                )));
            }
        }
        if !ev.job_id.is_empty() {
            let Some(job) = self.db.job(&ev.job_id).await? else {
                return Ok(Err(format!("no job {}", ev.job_id)));
            };
            // Jobs sent by an older vimd have no host recorded: their VM's host then.
            let sent_to = if job.host_id.is_empty() {
                self.db
                    .vm(&job.vm_id)
                    .await?
                    .map(|v| v.host_id)
                    .unwrap_or_default()
            } else {
                job.host_id.clone()
            };
            if sent_to != sender {
                return Ok(Err(format!("job {} was not sent to {sender}", job.id)));
            }
            let kind_ok = answer_kind(job.kind) == ev.kind()
                || (!ev.ok
                    && matches!(
                        ev.kind(),
                        EventKind::CommandFailed | EventKind::CommandRefused
                    ));
            if !kind_ok {
                return Ok(Err(format!(
                    "{} does not answer a {} job",
                    ev.kind(),
                    job.kind
                )));
            }
            if ev.vm.as_ref().is_some_and(|r| r.vm_id != job.vm_id) {
                return Ok(Err(format!("the report is not about job {}'s VM", job.id)));
            }
            return Ok(Ok(CheckedEvent {
                vm_id: job.vm_id.clone(),
                job: Some(job),
            }));
        }
        // Without a job: only a report that one of the sender's own VMs failed.
        if ev.kind() != EventKind::VmFailure {
            return Ok(Err(format!("{} without a job", ev.kind())));
        }
        let Some(r) = &ev.vm else {
            return Ok(Err("VM_Failure without its VM".into()));
        };
        match self.db.vm(&r.vm_id).await? {
            Some(vm) if vm.host_id == sender => Ok(Ok(CheckedEvent {
                vm_id: vm.id,
                job: None,
            })),
            _ => Ok(Err(format!("VM {:?} is not on {sender}", r.vm_id))),
        }
    }

    /// A host event refused: logged, audited (who: the host), and dropped.
    async fn refuse_host_event(&self, sender: &str, ev: &vim_proto::HostEvent, why: &str) {
        let target = if ev.job_id.is_empty() {
            ev.vm.as_ref().map(|v| v.vm_id.clone()).unwrap_or_default()
        } else {
            ev.job_id.clone()
        };
        tracing::warn!(
            host = sender,
            kind = ev.kind().as_str(),
            target,
            why,
            "host event refused"
        );
        let e = db::AuditEntry {
            ts: db::now_ms(),
            who: format!("host:{sender}"),
            action: format!("host.event.{}", ev.kind().as_str()),
            target: target.chars().take(100).collect(),
            outcome: "refused".into(),
            detail: why.chars().take(500).collect(),
        };
        if let Err(err) = self.audit.record(e).await {
            tracing::error!(error = %err, "cannot audit a refused host event");
        }
    }
}

/// What a checked host event applies to.
struct CheckedEvent {
    vm_id: String,
    job: Option<db::Job>,
}

/// The event kind that answers a job of `kind`.
fn answer_kind(kind: JobKind) -> EventKind {
    match kind {
        JobKind::Create => EventKind::VmCreated,
        JobKind::Start => EventKind::VmStarted,
        JobKind::Stop => EventKind::VmStopped,
        JobKind::Delete => EventKind::VmDeleted,
    }
}

/// What handling a job does next.
enum Step {
    Send(Action),
    /// Not yet: work for it is under way elsewhere (a disk copy), which handles it again.
    Later,
    Refuse(String),
}

/// Job workers: `n` tasks on the shared durable consumer. A job is acked after it is handled;
/// while a long one runs, in-progress acks keep it from being redelivered.
pub async fn run_job_workers(v: Arc<Vimd>, n: usize) -> Result<()> {
    let stream =
        v.js.get_stream(s::JOB_STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let consumer = stream
        .get_or_create_consumer(
            s::JOB_CONSUMER,
            queue::pull_config(s::JOB_CONSUMER, s::JOBS, Duration::from_secs(30)),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for _ in 0..n {
        let v = v.clone();
        let consumer = consumer.clone();
        tokio::spawn(async move {
            loop {
                let mut msgs = match consumer.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(error = %e, "job consumer");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(m) = msgs.next().await {
                    let Ok(m) = m else { break };
                    let job = match vim_proto::Job::decode_checked(&m.payload) {
                        Ok(j) => j,
                        Err(e) => {
                            vim_proto::dead_letter(
                                &v.js,
                                s::DEAD_LETTER,
                                &m.subject,
                                &m.payload,
                                &e.to_string(),
                            )
                            .await;
                            let _ = m.ack_with(AckKind::Term).await;
                            continue;
                        }
                    };
                    let _ = m.ack_with(AckKind::Progress).await;
                    match v.handle_job(&job.job_id).await {
                        Ok(()) => {
                            let _ = m.ack().await;
                        }
                        Err(e) => {
                            tracing::warn!(job = job.job_id, error = %e, "job failed; redelivered later");
                            let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

/// Agents' answers and events.
pub async fn run_event_consumer(v: Arc<Vimd>) -> Result<()> {
    let stream =
        v.js.get_stream(s::EVENT_STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let consumer = stream
        .get_or_create_consumer(
            s::EVENT_CONSUMER,
            queue::pull_config(
                s::EVENT_CONSUMER,
                s::ALL_HOST_EVENTS,
                Duration::from_secs(30),
            ),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut msgs) = consumer.messages().await else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            while let Some(Ok(m)) = msgs.next().await {
                // The stream takes only `vim.ev.<host>`, and each host may publish only its own.
                let Some(sender) = s::sender(&m.subject, s::EVENTS_PREFIX) else {
                    let _ = m.ack_with(AckKind::Term).await;
                    continue;
                };
                match vim_proto::HostEvent::decode_checked(&m.payload) {
                    Ok(ev) => match v.handle_host_event(sender, ev).await {
                        Ok(()) => {
                            let _ = m.ack().await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "host event not handled; redelivered");
                            let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        }
                    },
                    Err(e) => {
                        vim_proto::dead_letter(
                            &v.js,
                            &s::host_dead_letter(sender),
                            &m.subject,
                            &m.payload,
                            &e.to_string(),
                        )
                        .await;
                        let _ = m.ack_with(AckKind::Term).await;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Heartbeats in, and the clock that notices missing ones: `PS_Timeout` for each missed interval,
/// `PS_Unreachable` at the configured count (the host and its VMs are marked), `PS_Reachable`
/// when it beats again. Liveness lives in memory (`monitor.rs`). One task takes heartbeats in and
/// runs the clock without ever waiting for the database; a second writes what it saw, in order
/// and in batches, so 10,000 hosts cost a few transactions a second and a slow database delays
/// the records, not the liveness.
pub async fn run_monitor(v: Arc<Vimd>) -> Result<()> {
    v.liveness.load(&v.db.hosts().await?);
    let mut sub = v.nats.subscribe(s::ALL_HEARTBEATS).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let v2 = v.clone();
    tokio::spawn(async move {
        let every = v2.monitoring.interval;
        let mut flush = tokio::time::interval(HEARTBEAT_BATCH.min(every));
        let mut clock = tokio::time::interval(every);
        let mut seen = Seen::default();
        loop {
            tokio::select! {
                m = sub.next() => {
                    let Some(m) = m else { break };
                    // The subject names the sender (its permissions allow only its own); what
                    // a host sends wrong goes to its own share of the dead letters.
                    let Some(sender) = s::sender(&m.subject, s::HEARTBEATS_PREFIX) else {
                        continue;
                    };
                    let dead = s::host_dead_letter(sender);
                    let mut hb = match vim_proto::Heartbeat::decode_checked(&m.payload) {
                        Ok(hb) => hb,
                        Err(e) => {
                            vim_proto::dead_letter(&v2.js, &dead, &m.subject, &m.payload, &e.to_string()).await;
                            continue;
                        }
                    };
                    if hb.host_id != sender {
                        vim_proto::dead_letter(&v2.js, &dead, &m.subject, &m.payload, "host id does not match subject")
                            .await;
                        continue;
                    }
                    crate::monitor::bound_report(&mut hb);
                    match v2.liveness.beat(hb, db::now_ms()) {
                        Beat::Steady | Beat::Unknown => {}
                        Beat::Returned { before, hb } => seen.returned.push((before, hb)),
                    }
                }
                _ = flush.tick() => {
                    if tx.send(std::mem::take(&mut seen)).is_err() {
                        break;
                    }
                }
                _ = clock.tick() => {
                    let misses = v2.liveness.tick(db::now_ms(), every, v2.monitoring.misses_for_unreachable);
                    if !misses.is_empty() && tx.send(Seen { misses, ..Default::default() }).is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(seen) = rx.recv().await {
            v.record_seen(seen).await;
        }
    });
    Ok(())
}

/// What the monitor saw since it last handed over.
#[derive(Default)]
struct Seen {
    /// Hosts reachable again (or for the first time), with the state they were in.
    returned: Vec<(HostState, vim_proto::Heartbeat)>,
    misses: Vec<crate::monitor::Miss>,
}

impl Vimd {
    /// Writes what the monitor saw: heartbeat reports (the facts placement needs) before the
    /// states that make a host count, then the events.
    async fn record_seen(&self, mut seen: Seen) {
        // Hosts registered since this vimd loaded them (perhaps through another vimd), looked up
        // together.
        let asked = self.liveness.pending();
        if !asked.is_empty() {
            match self.db.hosts_among(&asked).await {
                Ok(found) => seen.returned.extend(self.liveness.adopt(&found, &asked)),
                Err(e) => tracing::error!(error = %e, "cannot look up hosts that heartbeat"),
            }
        }
        let beats = self.liveness.to_flush(db::now_ms());
        if let Err(e) = self.db.record_heartbeats(&beats).await {
            tracing::error!(error = %e, hosts = beats.len(), "cannot record heartbeats");
        }
        let mut states = Vec::new();
        let mut events = Vec::new();
        for (before, hb) in seen.returned {
            states.push(db::HostChange {
                host: hb.host_id.clone(),
                state: HostState::Reachable,
                missed: 0,
            });
            events.push(if before == HostState::Unreachable {
                Event::new(
                    EventKind::PsReachable,
                    &hb.host_id,
                    "",
                    "",
                    "heartbeats again",
                )
            } else {
                Event::new(EventKind::HostRegistered, &hb.host_id, "", "", &hb.hostname)
            });
        }
        for m in seen.misses {
            let detail = format!("no heartbeat for {} ms ({} missed)", m.silent_ms, m.missed);
            events.push(Event::new(EventKind::PsTimeout, &m.host, "", "", &detail));
            if m.unreachable_now {
                let detail = format!("{} heartbeats missed in a row", m.missed);
                events.push(Event::new(
                    EventKind::PsUnreachable,
                    &m.host,
                    "",
                    "",
                    &detail,
                ));
            }
            states.push(db::HostChange {
                state: if m.unreachable_now {
                    HostState::Unreachable
                } else {
                    HostState::Reachable
                },
                host: m.host,
                missed: m.missed,
            });
        }
        if let Err(e) = self.db.set_host_states(&states).await {
            tracing::error!(error = %e, hosts = states.len(), "cannot record host states");
        }
        self.record_events(events).await;
    }
}

/// How often heartbeat reports are written (one batch each time).
const HEARTBEAT_BATCH: Duration = Duration::from_secs(1);

/// The outbox reconciler: jobs committed but not confirmed published (vimd died between the two,
/// or NATS was down) are published again; so are jobs published but not taken within
/// `job_resend` (a message NATS lost), under a fresh message id; and a running job with no
/// answer from its host within `job_resend` has its host command sent again. Handlers are
/// idempotent by job id, so a second copy costs nothing.
pub async fn run_reconciler(v: Arc<Vimd>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let age = v.job_resend.as_millis() as i64;
        loop {
            tick.tick().await;
            if let Some(n) = &v.embedded {
                n.supervise();
            }
            match v.db.unpublished_jobs(2000).await {
                Ok(jobs) => republish(&v, jobs, false, "republishing unconfirmed jobs").await,
                Err(e) => tracing::warn!(error = %e, "reconciler"),
            }
            if let Ok(jobs) = v.db.stale_jobs(JobState::Pending, age).await {
                republish(
                    &v,
                    jobs,
                    true,
                    "jobs published but not taken; publishing again",
                )
                .await;
            }
            if let Ok(jobs) = v.db.stale_jobs(JobState::Running, age).await {
                for j in jobs {
                    tracing::warn!(
                        job = j.id,
                        "no answer from the host; sending the command again"
                    );
                    if let Err(e) = v.resend(&j).await {
                        tracing::warn!(job = j.id, error = %e, "resend failed");
                    }
                }
            }
        }
    });
}

/// Housekeeping: failed logins not audited one by one become summary rows (every 10 s), and
/// events and audit entries past their retention are dropped (hourly, and once at start).
pub fn run_housekeeping(v: Arc<Vimd>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            crate::api::audit_login_summary(&v).await;
            if n.is_multiple_of(360) {
                let now = db::now_ms();
                let before = |d: Duration| now - d.as_millis() as i64;
                match v
                    .db
                    .expire(before(v.retention.events), before(v.retention.audit))
                    .await
                {
                    Ok(0) => {}
                    Ok(gone) => tracing::info!(rows = gone, "expired old events and audit entries"),
                    Err(e) => tracing::warn!(error = %e, "cannot expire old events"),
                }
            }
            n += 1;
        }
    });
}

/// Publishes `jobs` again through the outbox's path. `fresh` gives each a new message id, for a
/// message JetStream stored and then lost (the duplicate window would drop the same id).
async fn republish(v: &Vimd, jobs: Vec<db::Job>, fresh: bool, why: &str) {
    if jobs.is_empty() {
        return;
    }
    tracing::warn!(jobs = jobs.len(), "{why}");
    let now = db::now_ms();
    let ids: Vec<_> = jobs
        .into_iter()
        .map(|j| {
            let msg_id = if fresh {
                format!("{}-{now}", j.id)
            } else {
                j.id.clone()
            };
            (j.id, msg_id)
        })
        .collect();
    if let Err(e) = outbox::publish(&v.js, &v.db, &ids).await {
        tracing::warn!(error = %e, "republish failed");
    }
}
