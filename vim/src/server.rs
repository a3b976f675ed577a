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

use crate::db::{self, Db, Event};
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
}

impl Vimd {
    /// A VM's directory on shared storage: its disk copy and console log.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.shared_dir.join("vms").join(vm_id)
    }

    /// Records an event and tells the SSE listeners.
    pub async fn event(&self, kind: &str, host_id: &str, vm_id: &str, job_id: &str, detail: &str) {
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
                kind = e.kind,
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
            .transition_job(&job.id, &["pending", "running"], "failed", why)
            .await
        {
            if job.kind == "create" {
                let _ = self.db.set_vm_state(&job.vm_id, "failed", 0).await;
            }
            self.event("Job_Failed", "", &job.vm_id, &job.id, why).await;
        }
    }

    /// One job, idempotently: a job already past `pending` is not done again (its host command,
    /// if any, was sent with the job id as message id and the agent dedups by job id too).
    async fn handle_job(&self, job_id: &str) -> Result<()> {
        let Some(job) = self.db.job(job_id).await? else {
            tracing::warn!(job_id, "job not in the database; dropped");
            return Ok(());
        };
        if job.state != "pending" {
            return Ok(());
        }
        let Some(vm) = self.db.vm(&job.vm_id).await? else {
            self.fail_job(&job, "the VM does not exist").await;
            return Ok(());
        };
        let host_id = if job.kind == "create" && vm.host_id.is_empty() {
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
        let action = match self.host_action(&job, &vm, &host_id).await? {
            Ok(a) => a,
            Err(why) => {
                self.fail_job(&job, &why).await;
                return Ok(());
            }
        };
        if host_id.is_empty() {
            // A VM never placed (its create failed): deleting it needs no host.
            if job.kind == "delete" {
                self.db.set_vm_state(&vm.id, "deleted", 0).await?;
                self.db
                    .transition_job(&job.id, &["pending"], "done", "")
                    .await?;
                return Ok(());
            }
            self.fail_job(&job, "the VM is on no host").await;
            return Ok(());
        }
        self.send_to_host(&host_id, &job.id, action).await?;
        self.db
            .transition_job(&job.id, &["pending"], "running", "")
            .await?;
        self.event("Job_Sent", &host_id, &vm.id, &job.id, &job.kind)
            .await;
        Ok(())
    }

    /// The host command that carries out `job` on `vm`, placed on `host_id`; `Ok(Err(why))` when
    /// the job cannot be done. Safe to call again for the same job (a resend): the disk copy
    /// is made once.
    async fn host_action(
        &self,
        job: &db::Job,
        vm: &db::Vm,
        host_id: &str,
    ) -> Result<Result<Action, String>> {
        let action = match job.kind.as_str() {
            "create" => {
                let Some(image) = self.db.image(&vm.image).await? else {
                    return Ok(Err(format!("image {} does not exist", vm.image)));
                };
                // The VM's own copy of the image's disk, on shared storage.
                let disk = if image.disk.is_empty() {
                    String::new()
                } else {
                    let dir = self.vm_dir(&vm.id);
                    tokio::fs::create_dir_all(&dir).await?;
                    let d = dir.join("disk.img");
                    // A redelivered job finds the copy made (renamed last, so it is whole).
                    if !tokio::fs::try_exists(&d).await? {
                        let tmp = dir.join("disk.img.tmp");
                        tokio::fs::copy(&image.disk, &tmp).await?;
                        tokio::fs::File::open(&tmp).await?.sync_all().await?;
                        tokio::fs::rename(&tmp, &d).await?;
                    }
                    d.display().to_string()
                };
                self.db.place_vm(&vm.id, host_id, &disk).await?;
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
            "start" => Action::Start(vm.id.clone()),
            "stop" => Action::Stop(vim_proto::StopVm {
                vm_id: vm.id.clone(),
                timeout_ms: 10_000,
            }),
            "delete" => Action::Delete(vm.id.clone()),
            other => return Ok(Err(format!("unknown job kind {other}"))),
        };
        Ok(Ok(action))
    }

    /// Sends a running job's host command again, under a fresh message id: the first copy may
    /// have been lost (nats-server killed before its store reached the disk). The agent answers
    /// a job it has done from its stored result, so a second copy never does the work twice.
    async fn resend(&self, job: &db::Job) -> Result<()> {
        let Some(vm) = self.db.vm(&job.vm_id).await? else {
            return Ok(());
        };
        if vm.host_id.is_empty() {
            return Ok(());
        }
        match self.host_action(job, &vm, &vm.host_id).await? {
            Ok(action) => {
                let msg_id = format!("{}-{}", job.id, db::now_ms());
                self.send_to_host_as(&vm.host_id, &job.id, &msg_id, action)
                    .await
            }
            Err(why) => {
                self.fail_job(job, &why).await;
                Ok(())
            }
        }
    }

    /// An agent's answer or report.
    async fn handle_host_event(&self, ev: vim_proto::HostEvent) -> Result<()> {
        let vm_id = ev.vm.as_ref().map(|v| v.vm_id.clone()).unwrap_or_default();
        if let Some(v) = &ev.vm {
            self.db
                .set_vm_state(&v.vm_id, &v.state, i64::from(v.pid))
                .await?;
        }
        if !ev.job_id.is_empty() {
            let (to, err) = if ev.ok {
                ("done", String::new())
            } else {
                ("failed", ev.error.clone())
            };
            let moved = self
                .db
                .transition_job(&ev.job_id, &["running", "pending"], to, &err)
                .await?;
            if !moved {
                return Ok(()); // a redelivered answer
            }
            if ev.ok && ev.kind == "VM_Deleted" {
                // Its disk copy goes with it (the image's disk stays).
                let dir = self.vm_dir(&vm_id);
                if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(vm = vm_id, dir = %dir.display(), error = %e, "cannot remove a deleted VM's files");
                    }
                }
            }
        }
        let detail = if ev.ok { String::new() } else { ev.error };
        self.event(&ev.kind, &ev.host_id, &vm_id, &ev.job_id, &detail)
            .await;
        Ok(())
    }
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
                            vim_proto::dead_letter(&v.js, &m.subject, &m.payload, &e.to_string())
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
                match vim_proto::HostEvent::decode_checked(&m.payload) {
                    Ok(ev) => match v.handle_host_event(ev).await {
                        Ok(()) => {
                            let _ = m.ack().await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "host event not handled; redelivered");
                            let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        }
                    },
                    Err(e) => {
                        vim_proto::dead_letter(&v.js, &m.subject, &m.payload, &e.to_string()).await;
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
                    let hb = match vim_proto::Heartbeat::decode_checked(&m.payload) {
                        Ok(hb) => hb,
                        Err(e) => {
                            vim_proto::dead_letter(&v2.js, &m.subject, &m.payload, &e.to_string()).await;
                            continue;
                        }
                    };
                    // The subject names the sender (its permissions allow only its own).
                    if m.subject.as_str() != s::heartbeat(&hb.host_id) {
                        vim_proto::dead_letter(&v2.js, &m.subject, &m.payload, "host id does not match subject")
                            .await;
                        continue;
                    }
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
    returned: Vec<(String, vim_proto::Heartbeat)>,
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
            states.push(db::HostState {
                host: hb.host_id.clone(),
                state: "reachable".into(),
                missed: 0,
            });
            events.push(if before == "unreachable" {
                Event::new("PS_Reachable", &hb.host_id, "", "", "heartbeats again")
            } else {
                Event::new("Host_Registered", &hb.host_id, "", "", &hb.hostname)
            });
        }
        for m in seen.misses {
            let detail = format!("no heartbeat for {} ms ({} missed)", m.silent_ms, m.missed);
            events.push(Event::new("PS_Timeout", &m.host, "", "", &detail));
            if m.unreachable_now {
                let detail = format!("{} heartbeats missed in a row", m.missed);
                events.push(Event::new("PS_Unreachable", &m.host, "", "", &detail));
            }
            states.push(db::HostState {
                state: if m.unreachable_now {
                    "unreachable"
                } else {
                    "reachable"
                }
                .into(),
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
            if let Ok(jobs) = v.db.stale_jobs("pending", age).await {
                republish(
                    &v,
                    jobs,
                    true,
                    "jobs published but not taken; publishing again",
                )
                .await;
            }
            if let Ok(jobs) = v.db.stale_jobs("running", age).await {
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
