//! The event consumer: agents' answers to commands and their reports of VMs that failed, each
//! checked against the job it claims to answer before it changes anything.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use vim_proto::{subjects as s, Versioned};

use super::Vimd;
use crate::db::{self, EventKind, JobKind, JobState, VmState};
use crate::queue;

impl Vimd {
    /// An agent's answer or report, from host `sender` (the subject it came on, which NATS
    /// permissions make the publisher's own). Nothing in it is taken on trust: the job record
    /// says which VM, which host and which kind of answer is due, and an answer that does not
    /// match it, or a report about a VM that is not on the sender, is refused and audited.
    async fn handle_host_event(
        self: &Arc<Self>,
        sender: &str,
        ev: vim_proto::HostEvent,
    ) -> Result<()> {
        let checked = match self.check_host_event(sender, &ev).await? {
            Ok(c) => c,
            Err(why) => {
                self.refuse_host_event(sender, &ev, &why).await;
                return Ok(());
            }
        };
        if let Some(p) = ev.progress.as_ref().filter(|_| checked.job.is_none()) {
            // Not an answer, not kept as an event (one a second): the migration job shows it.
            let progress = serde_json::json!({
                "phase": p.phase,
                "round": p.round,
                "bytes_written": p.bytes_written,
                "remaining_bytes": p.remaining_bytes,
                "dirty_rate_mib_s": p.dirty_rate_mib_s,
            });
            self.db
                .set_migration_progress(&checked.vm_id, &progress.to_string())
                .await?;
            return Ok(());
        }
        // A migration step's report is about one side of the move; the migration decides the
        // VM's state and host.
        // An eviction's report is about the copy on the host that came back, not the VM.
        let step = checked.job.as_ref().is_some_and(|j| {
            !j.parent_id.is_empty() || matches!(j.kind, JobKind::Evict | JobKind::Standby)
        });
        if let Some(v) = ev.vm.as_ref().filter(|_| !step) {
            self.db
                .set_vm_state(&checked.vm_id, v.state(), i64::from(v.pid), v.seq)
                .await?;
        }
        // A resize's new size is recorded before its job ends, so an answer delivered again
        // after a crash in between records it (idempotently: the same size bills nothing new)
        // instead of finding the job ended and dropping it.
        let resized = match checked.job.as_ref().filter(|j| j.kind == JobKind::Resize) {
            Some(job) if job.state == JobState::Running || job.state == JobState::Pending => {
                let detail = self.resize_answer(job, &ev).await?;
                // Crash tests (docs/billing.md): vimd held here (FAILPOINTS=…=pause) and killed,
                // the size recorded, the job not ended, the answer not acknowledged.
                fail::fail_point!("vimd-resize-recorded");
                Some(detail)
            }
            _ => None,
        };
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
            self.job_ended(job, to);
            if !ev.ok && job.kind == JobKind::Create && ev.vm.is_none() {
                // Refused before the agent knew the VM (a bad spec): it will not run there.
                self.db
                    .set_vm_state(&checked.vm_id, VmState::Failed, 0, 0)
                    .await?;
            }
            if step && !matches!(job.kind, JobKind::Evict | JobKind::Standby) {
                self.migration_answer(job, &ev).await?;
            }
            if job.kind == JobKind::Standby && !ev.ok {
                // Placed again elsewhere by the standby keeper.
                self.db
                    .set_standby_host(&checked.vm_id, &job.host_id, "")
                    .await?;
            }
            if job.kind == JobKind::Restart {
                if !ev.ok {
                    self.db
                        .set_vm_state(&checked.vm_id, VmState::Failed, 0, 0)
                        .await?;
                }
                self.restart_answer(job, &ev).await?;
            }
            // Suspended: on no host. A resume that failed leaves it so, its state untouched.
            if (ev.ok && job.kind == JobKind::Suspend) || (!ev.ok && job.kind == JobKind::Resume) {
                self.db.suspend_vm(&checked.vm_id).await?;
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
        // An answer's error, or what a report says (a fence's).
        let mut detail = ev.error.clone();
        if let Some(d) = resized {
            detail = d;
        }
        if let Some(r) = &ev.scale {
            detail = format!(
                "CPU {:.0} % of {} vCPUs{} for {} s",
                r.cpu_pct,
                r.vcpus,
                r.memory_pct
                    .map(|m| format!(", memory {m:.0} %"))
                    .unwrap_or_default(),
                r.window_s
            );
        }
        self.event(kind, sender, &checked.vm_id, &ev.job_id, &detail)
            .await;
        if kind == EventKind::VmFailure && checked.job.is_none() {
            self.on_vm_failure(sender, &checked.vm_id).await?;
        }
        if kind == EventKind::HostSelfFenced {
            self.on_self_fenced(sender).await?;
        }
        if let (Some(r), None) = (&ev.scale, &checked.job) {
            self.on_scale_request(&checked.vm_id, kind == EventKind::ScaleUpRequested, r)
                .await?;
        }
        Ok(())
    }

    /// A resize's answer: the VM's vCPUs and memory as its host reports them now (a resize the
    /// guest did only part of changed some); the event's detail.
    async fn resize_answer(&self, job: &db::Job, ev: &vim_proto::HostEvent) -> Result<String> {
        let (old, old_mib) = self
            .db
            .vm(&job.vm_id)
            .await?
            .map_or((0, 0), |vm| (vm.vcpus, vm.memory_mib));
        // 0: the host did not say (an older agent); the VIM's figure stands.
        let reported = ev.vm.as_ref();
        let now = reported.map_or(0, |r| i64::from(r.vcpus));
        let now = if now > 0 { now } else { old };
        let now_mib = reported.map_or(0, |r| r.memory_mib as i64);
        let now_mib = if now_mib > 0 { now_mib } else { old_mib };
        if (now, now_mib) != (old, old_mib) {
            self.db.set_vm_size(&job.vm_id, now, now_mib).await?;
        }
        let mut sizes = format!("vcpus {old} -> {now}");
        if now_mib != old_mib {
            sizes += &format!(", memory {old_mib} -> {now_mib} MiB");
        }
        Ok(if ev.ok {
            sizes
        } else {
            format!("{}; {sizes}", ev.error)
        })
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
            let kind_ok = answer_kind(job.kind) == Some(ev.kind())
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
        // Without a job: only a report that one of the sender's own VMs failed or stopped or
        // resumed heartbeating, or how its migration away advances.
        let vm_id = match (ev.kind(), &ev.vm, &ev.progress) {
            (
                EventKind::VmFailure | EventKind::VmUnreachable | EventKind::VmReachable,
                Some(r),
                None,
            ) => &r.vm_id,
            (EventKind::VmMigrationProgress, None, Some(p)) => &p.vm_id,
            (EventKind::ScaleUpRequested | EventKind::ScaleDownRequested, None, None) => {
                match &ev.scale {
                    Some(r) => &r.vm_id,
                    None => return Ok(Err(format!("{} without its request", ev.kind()))),
                }
            }
            // About the host itself.
            (EventKind::HostSelfFenced, None, None) => {
                return Ok(Ok(CheckedEvent {
                    vm_id: String::new(),
                    job: None,
                }))
            }
            (
                EventKind::VmFailure
                | EventKind::VmUnreachable
                | EventKind::VmReachable
                | EventKind::VmMigrationProgress,
                _,
                _,
            ) => {
                return Ok(Err(format!("{} without its VM", ev.kind())));
            }
            _ => return Ok(Err(format!("{} without a job", ev.kind()))),
        };
        match self.db.vm(vm_id).await? {
            Some(vm) if vm.host_id == sender => Ok(Ok(CheckedEvent {
                vm_id: vm.id,
                job: None,
            })),
            _ => Ok(Err(format!("VM {vm_id:?} is not on {sender}"))),
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

/// The event kind that answers a job of `kind`; none for a migration itself, which no host
/// answers (its steps are answered).
fn answer_kind(kind: JobKind) -> Option<EventKind> {
    Some(match kind {
        JobKind::Create => EventKind::VmCreated,
        JobKind::Start => EventKind::VmStarted,
        JobKind::Stop => EventKind::VmStopped,
        JobKind::Delete => EventKind::VmDeleted,
        JobKind::MigrateIn => EventKind::VmIncomingReady,
        JobKind::MigrateOut => EventKind::VmMigrated,
        JobKind::AbortIncoming => EventKind::VmIncomingAborted,
        JobKind::Restart => EventKind::VmCreated,
        JobKind::Evict => EventKind::VmEvicted,
        JobKind::Standby => EventKind::VmStandbyReady,
        JobKind::Resize => EventKind::VmResized,
        JobKind::SetScaling => EventKind::VmScalingSet,
        JobKind::SetCheckpoints => EventKind::VmCheckpointsSet,
        JobKind::Suspend => EventKind::VmSuspended,
        JobKind::Resume => EventKind::VmResumed,
        JobKind::Migrate => return None,
    })
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
