//! Live migration between hosts, driven as a job with one child job per host command: the
//! target's agent starts a VMM waiting for the handover (`migrate-in`), then the source's agent
//! hands the VM over (`migrate-out`); if that fails before the target took the VM, the target's
//! waiting VMM is stopped (`abort-incoming`). The VM's host changes only when the source reports
//! the handover completed, in one statement with its state. Each step is idempotent on
//! redelivery: the agents answer a job they have done from its stored result.

use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use vim_proto::HostEvent;

use super::Vimd;
use crate::db::{self, EventKind, Job, JobKind, JobState, VmState};
use crate::placement;

/// How long a target's VMM waits for the handover: the source starts its part at once after the
/// target answers, so this only bounds a migration whose source never comes.
pub const INCOMING_WAIT_MS: u64 = 10 * 60 * 1000;
/// How long the target has to claim and resume the VM once it is handed over.
pub const HANDOVER_TIMEOUT_MS: u64 = 10_000;
/// The guest's pause, at most, unless the caller asks for another.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// The longest pause a caller may ask for.
pub const MAX_DOWNTIME_MS: u64 = 60_000;

/// A migrate job's parameters: what was asked (`to`, `downtime_ms`) and what was decided.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrateParams {
    /// The host asked for, if any (otherwise placement chooses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub downtime_ms: u64,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub target: String,
    /// Set by the scaler: once the VM runs on the target, it is resized to this many vCPUs
    /// (its own host had no room for them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then_vcpus: Option<u32>,
    /// And to this much memory, when that changes too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then_memory_mib: Option<u64>,
    /// Why the VIM moves it on its own (`rebalance`, `drain`, `scaling`); none: a caller asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl MigrateParams {
    pub fn of(job: &Job) -> MigrateParams {
        serde_json::from_str(&job.params).unwrap_or_default()
    }
}

/// How many migrations a host sends and takes at once (KubeVirt and VDSM default to 2 each).
#[derive(Debug, Clone, Copy)]
pub struct MigrationLimits {
    pub outgoing: i64,
    pub incoming: i64,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        MigrationLimits {
            outgoing: 2,
            incoming: 2,
        }
    }
}

impl Vimd {
    /// A slot has freed up: migrations waiting for one go back to the workers (under fresh
    /// message ids; the first copies are in the duplicate window).
    async fn take_waiting_migrations(&self) {
        match self.db.pending_jobs(JobKind::Migrate).await {
            Ok(jobs) if !jobs.is_empty() => {
                let now = db::now_ms();
                let ids: Vec<_> = jobs
                    .into_iter()
                    .map(|j| {
                        let m = format!("{}-{now}", j.id);
                        (j.id, m)
                    })
                    .collect();
                if let Err(e) = crate::outbox::publish(&self.js, &self.db, &ids).await {
                    tracing::warn!(error = %e, "cannot hand waiting migrations to the workers");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot look up waiting migrations"),
        }
    }

    /// A migrate job taken by a worker: choose the target, mark the VM migrating, and send the
    /// first step to the target.
    pub(super) async fn start_migration(self: &Arc<Self>, job: &Job, vm: &db::Vm) -> Result<()> {
        // One worker at a time decides, on fresh records: a second copy of this job (a waiting
        // migration handed out again just as a worker took it) must find it taken and do
        // nothing, not fail it because the VM is migrating by then. The slots are counted and
        // claimed under the same lock, so this vimd starts no more than the limits.
        let slots = self.migration_slots.lock().await;
        let (Some(job), Some(vm)) = (self.db.job(&job.id).await?, self.db.vm(&vm.id).await?) else {
            return Ok(());
        };
        if job.state != JobState::Pending {
            return Ok(());
        }
        let (job, vm) = (&job, &vm);
        let mut p = MigrateParams::of(job);
        if vm.state != VmState::Running || vm.host_id.is_empty() {
            self.fail_job(job, &format!("the VM is {}, not running", vm.state))
                .await;
            return Ok(());
        }
        if p.to.as_deref() == Some(vm.host_id.as_str()) {
            self.fail_job(job, &format!("the VM already runs on {}", vm.host_id))
                .await;
            return Ok(());
        }
        let among = placement::Among::for_vm(vm, p.to.as_deref(), Some(&vm.host_id));
        let target = match placement::choose(&self.db, &self.policy, vm.vcpus, vm.memory_mib, among)
            .await?
        {
            Ok(h) => h,
            Err(why) => {
                self.fail_job(job, &why).await;
                return Ok(());
            }
        };
        {
            let (out, inc) = self.db.migrations_at(&vm.host_id, &target).await?;
            if out >= self.migration_limits.outgoing || inc >= self.migration_limits.incoming {
                // Stays pending: taken again when a migration ends (or by the reconciler).
                tracing::info!(
                    vm = vm.id,
                    source = vm.host_id,
                    target,
                    out,
                    inc,
                    "migration waits for a slot"
                );
                return Ok(());
            }
            if !self
                .db
                .transition_vm(&vm.id, VmState::Running, VmState::Migrating)
                .await?
            {
                self.fail_job(job, "the VM is not running (it changed meanwhile)")
                    .await;
                return Ok(());
            }
            // The target, as the migration's host: it counts against the target's slots.
            p.source = vm.host_id.clone();
            p.target = target.clone();
            self.db
                .set_job_params(&job.id, &serde_json::to_string(&p)?)
                .await?;
            self.db.assign_job_host(&job.id, &target).await?;
            self.db
                .transition_job(&job.id, &[JobState::Pending], JobState::Running, "")
                .await?;
        }
        drop(slots);
        self.event(
            EventKind::VmMigrating,
            &p.source,
            &vm.id,
            &job.id,
            &format!("{} -> {}", p.source, p.target),
        )
        .await;
        self.step(job, JobKind::MigrateIn, &target).await
    }

    /// Writes a child job of `parent` for `host` and sends its command. A step that cannot be
    /// sent fails the migration.
    async fn step(self: &Arc<Self>, parent: &Job, kind: JobKind, host: &str) -> Result<()> {
        let child = Job::child(parent, kind, host);
        self.db.add_step(&child).await?;
        self.dispatch(&child).await
    }

    /// Sends a step's command to its host (also for a step the reconciler found pending).
    pub(super) async fn dispatch(self: &Arc<Self>, child: &Job) -> Result<()> {
        let Some(vm) = self.db.vm(&child.vm_id).await? else {
            return Ok(());
        };
        let parent = self.db.job(&child.parent_id).await?;
        let live = parent.is_some_and(|p| p.state == JobState::Running);
        // An abort is sent after its migration failed; the other steps only while it runs.
        if !live && child.kind != JobKind::AbortIncoming {
            self.fail_job(child, "its migration has ended").await;
            return Ok(());
        }
        match self.host_action(child, &vm, &child.host_id).await? {
            super::jobs::Step::Send(action) => {
                self.send_to_host(&child.host_id, &child.id, action).await?;
                self.db
                    .transition_job(&child.id, &[JobState::Pending], JobState::Running, "")
                    .await?;
                self.event(
                    EventKind::JobSent,
                    &child.host_id,
                    &vm.id,
                    &child.id,
                    child.kind.as_str(),
                )
                .await;
                Ok(())
            }
            super::jobs::Step::Later => Ok(()),
            super::jobs::Step::Refuse(why) => {
                self.fail_job(child, &why).await;
                // Boxed: a failed step may send another (the abort), which comes back here.
                Box::pin(self.migration_failed(child, &why, false)).await
            }
        }
    }

    /// A host's answer to a migration step (already checked: right host, right kind, right VM).
    pub(super) async fn migration_answer(
        self: &Arc<Self>,
        child: &Job,
        ev: &HostEvent,
    ) -> Result<()> {
        match child.kind {
            JobKind::MigrateIn if ev.ok => {
                let Some(parent) = self.db.job(&child.parent_id).await? else {
                    return Ok(());
                };
                let p = MigrateParams::of(&parent);
                self.step(&parent, JobKind::MigrateOut, &p.source).await
            }
            JobKind::MigrateIn => {
                let why = format!("the target could not prepare: {}", ev.error);
                self.migration_failed(child, &why, false).await
            }
            JobKind::MigrateOut if ev.ok => self.migration_completed(child, ev).await,
            JobKind::MigrateOut => {
                let paused = ev.migration.as_ref().is_some_and(|m| m.waiting_for_target);
                self.migration_failed(child, &ev.error, !paused).await
            }
            _ => Ok(()),
        }
    }

    async fn migration_completed(self: &Arc<Self>, child: &Job, ev: &HostEvent) -> Result<()> {
        let Some(parent) = self.db.job(&child.parent_id).await? else {
            return Ok(());
        };
        let p = MigrateParams::of(&parent);
        let m = ev.migration.clone().unwrap_or_default();
        let how = serde_json::json!({
            "reason": p.reason,
            "source": p.source,
            "target": p.target,
            "downtime_ms": m.downtime_ms,
            "total_ms": m.total_ms,
            "bytes_written": m.bytes_written,
            "rounds": m.rounds,
            "at": db::now_ms(),
        });
        if !self
            .db
            .finish_migration(&child.vm_id, &p.target, 0, &how.to_string())
            .await?
        {
            tracing::warn!(
                vm = child.vm_id,
                "a migration completed for a VM no longer migrating"
            );
        }
        if self
            .db
            .transition_job(&parent.id, &[JobState::Running], JobState::Done, "")
            .await?
        {
            self.job_ended(&parent, JobState::Done);
            self.metrics.migrated(m.downtime_ms);
        }
        self.take_waiting_migrations().await;
        if let Some(vcpus) = p.then_vcpus {
            self.resize_after_migration(&parent, vcpus, p.then_memory_mib)
                .await?;
        }
        self.event(
            EventKind::VmMigrated,
            &p.target,
            &child.vm_id,
            &parent.id,
            &format!(
                "{} -> {}: downtime {:.1} ms, total {:.1} ms, {} rounds, {} MiB{}",
                p.source,
                p.target,
                m.downtime_ms,
                m.total_ms,
                m.rounds,
                m.bytes_written >> 20,
                p.reason
                    .map(|r| format!("; reason {r}"))
                    .unwrap_or_default()
            ),
        )
        .await;
        Ok(())
    }

    /// The migration of `child`'s parent failed. With `runs_on_source`, the guest runs on the
    /// source again (the target never took it), so the VM is running there and the target's
    /// waiting VMM is stopped; otherwise the target claimed the VM and went silent: the guest
    /// stays paused on the source, the VM stays `migrating`, and the event says so.
    async fn migration_failed(
        self: &Arc<Self>,
        child: &Job,
        why: &str,
        runs_on_source: bool,
    ) -> Result<()> {
        let Some(parent) = self.db.job(&child.parent_id).await? else {
            return Ok(());
        };
        let p = MigrateParams::of(&parent);
        let moved = self
            .db
            .transition_job(&parent.id, &[JobState::Running], JobState::Failed, why)
            .await?;
        if !moved {
            return Ok(()); // already ended
        }
        self.job_ended(&parent, JobState::Failed);
        self.take_waiting_migrations().await;
        let detail = if child.kind == JobKind::MigrateIn || runs_on_source {
            self.db
                .transition_vm(&child.vm_id, VmState::Migrating, VmState::Running)
                .await?;
            format!("{why}; the VM runs on {}", p.source)
        } else {
            format!(
                "{why}; the guest stays paused on {} until {} resumes or gives it back",
                p.source, p.target
            )
        };
        self.event(
            EventKind::VmMigrationFailed,
            &p.source,
            &child.vm_id,
            &parent.id,
            &detail,
        )
        .await;
        if child.kind == JobKind::MigrateOut && runs_on_source {
            self.step(&parent, JobKind::AbortIncoming, &p.target)
                .await?;
        }
        Ok(())
    }

    /// Host `host` went silent. A migration into it whose source has not been told to hand
    /// over yet fails now (the VM never left its source, which keeps it), and the target is
    /// told to drop its waiting VMM whenever it hears again. Once the handover was asked for,
    /// the source's VMM decides (the target claims in time, or the source takes the VM back).
    pub(super) async fn target_went_silent(self: &Arc<Self>, host: &str) -> Result<()> {
        for parent in self.db.migrations_into(host).await? {
            let steps = self.db.steps(&parent.id).await?;
            if steps.iter().any(|s| s.kind == JobKind::MigrateOut) {
                continue;
            }
            let Some(prepare) = steps.iter().find(|s| s.kind == JobKind::MigrateIn) else {
                continue;
            };
            let why = format!("the target host {host} went silent before the handover");
            self.fail_job(prepare, &why).await;
            self.migration_failed(prepare, &why, true).await?;
            self.step(&parent, JobKind::AbortIncoming, host).await?;
        }
        Ok(())
    }
}
