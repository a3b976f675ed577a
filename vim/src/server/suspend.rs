//! Suspend and resume anywhere (docs/suspend.md). A suspend job asks the VM's host to write the
//! VM's state to its directory on shared storage and stop its VMM; once answered the VM is
//! `suspended`, on no host, and its capacity is free. A resume job places it on any host with
//! room (or the one asked for), whose agent restores it there, memory mapped lazily: the guest
//! goes on where it was. With no room anywhere it waits `pending_resume` and is tried again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::Vimd;
use crate::db::{self, EventKind, VmState};
use crate::placement;

/// What a resume job asks for.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ResumeParams {
    /// The host to resume on; placement chooses without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// How often idle VMs are looked for.
const AUTO_SUSPEND_EVERY: Duration = Duration::from_secs(1);

/// Auto-suspend ("scale to zero"): every second, each running VM with an auto-suspend setting
/// whose CPU use per vCPU (from its host's reports) is at or below its threshold is timed, by
/// the time those figures were taken; one idle for its whole period, with no job under way, is
/// suspended. `vm start` brings it back.
/// The timing lives in vimd's memory: a vimd restart starts every period again.
pub fn run_auto_suspend(v: Arc<Vimd>) {
    tokio::spawn(async move {
        let mut idle_since: HashMap<String, i64> = HashMap::new();
        let mut tick = tokio::time::interval(AUTO_SUSPEND_EVERY);
        loop {
            tick.tick().await;
            if !v.is_leader() {
                idle_since.clear();
                continue;
            }
            if let Err(e) = v.auto_suspend_round(&mut idle_since).await {
                tracing::warn!(error = %e, "auto-suspend");
            }
        }
    });
}

/// How soon a resume waiting for room is tried again.
const RETRY_PLACEMENT: Duration = Duration::from_secs(2);

impl Vimd {
    async fn auto_suspend_round(
        self: &Arc<Self>,
        idle_since: &mut HashMap<String, i64>,
    ) -> Result<()> {
        let vms = self.db.auto_suspend_vms().await?;
        idle_since.retain(|id, _| vms.iter().any(|vm| &vm.id == id));
        for vm in vms {
            let pct = vm.cpu_pct / vm.vcpus.max(1) as f64;
            // No figures yet say nothing; figures over the threshold end an idle period.
            if vm.usage_at == 0 || pct > vm.auto_suspend_pct as f64 {
                idle_since.remove(&vm.id);
                continue;
            }
            // Timed by when the figures were taken: the database holds each VM's latest, which
            // its host's reports refresh every few seconds, so a period is idle only once figures
            // taken at its end are idle too (a VM that just started, its first figure low, is
            // not suspended before its next figure says whether it got busy).
            let since = *idle_since.entry(vm.id.clone()).or_insert(vm.usage_at);
            if vm.usage_at - since < vm.auto_suspend_s * 1000
                || self.db.unfinished_jobs_for(&vm.id).await? > 0
            {
                continue;
            }
            idle_since.remove(&vm.id);
            let job = self
                .queue_job(
                    db::JobKind::Suspend,
                    "auto-suspend",
                    &vm.id,
                    &serde_json::json!({}),
                )
                .await?;
            let why = format!(
                "CPU at or below {} % for {} s: suspending",
                vm.auto_suspend_pct, vm.auto_suspend_s
            );
            self.event(EventKind::VmIdle, &vm.host_id, &vm.id, &job.id, &why)
                .await;
        }
        Ok(())
    }

    pub(super) async fn resume(self: &Arc<Self>, job: &db::Job, vm: &db::Vm) -> Result<()> {
        if !matches!(vm.state, VmState::Suspended | VmState::PendingResume)
            || !vm.host_id.is_empty()
        {
            self.fail_job(job, &format!("VM {} is {}, not suspended", vm.id, vm.state))
                .await;
            return Ok(());
        }
        // Claimed first: a second copy of the job (the reconciler's, or the retry below) finds
        // it running and does nothing.
        if !self
            .db
            .transition_job(&job.id, &[db::JobState::Pending], db::JobState::Running, "")
            .await?
        {
            return Ok(());
        }
        let p: ResumeParams = serde_json::from_str(&job.params).unwrap_or_default();
        let among = placement::Among::for_vm(vm, p.to.as_deref(), None);
        let host = match placement::choose(&self.db, &self.policy, vm.vcpus, vm.memory_mib, among)
            .await?
        {
            Ok(h) => h,
            Err(why) => {
                self.db
                    .transition_job(&job.id, &[db::JobState::Running], db::JobState::Pending, "")
                    .await?;
                if vm.state != VmState::PendingResume
                    && self
                        .db
                        .transition_vm(&vm.id, vm.state, VmState::PendingResume)
                        .await?
                {
                    self.event(EventKind::VmResumeWaiting, "", &vm.id, &job.id, &why)
                        .await;
                }
                self.publish_later(&job.id, RETRY_PLACEMENT);
                return Ok(());
            }
        };
        let placed = self.send_placed(job, vm, "", &host).await?;
        if let super::jobs::Placed::Refused(_) = placed {
            // Back on no host, as it was.
            self.db.suspend_vm(&vm.id).await?;
        }
        if let Some(why) = placed.failure() {
            self.fail_job(job, why).await;
        } else if let super::jobs::Placed::Sent = placed {
            self.event(EventKind::JobSent, &host, &vm.id, &job.id, "resume")
                .await;
        }
        Ok(())
    }
}
