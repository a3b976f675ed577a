//! Job workers: take job ids from `VIM_JOBS`, place VMs, copy their disks, and send each job's
//! command to its host.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use vim_proto::{host_command::Action, subjects as s, Versioned};

use super::Vimd;
use crate::db::{self, EventKind, JobKind, JobState, VmState};
use crate::{outbox, placement, queue};

impl Vimd {
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
        // Only an eviction still goes out (a deleted VM's standby is stopped by one).
        if vm.state == VmState::Deleted && job.kind != JobKind::Evict {
            self.fail_job(&job, "the VM has been deleted").await;
            return Ok(());
        }
        // One change at a time: a suspend, resize or migration queued behind another one for
        // the same VM that has not ended (from the scaler, a drain, the balancer, a caller) is
        // refused; the earlier one goes ahead. Never both.
        if matches!(
            job.kind,
            JobKind::Suspend | JobKind::Resize | JobKind::Migrate
        ) {
            if let Some(first) = self.db.earlier_unfinished_job(&job).await? {
                let why = format!("the VM's {} job {} is under way", first.kind, first.id);
                self.fail_job(&job, &why).await;
                return Ok(());
            }
        }
        match job.kind {
            JobKind::Migrate => return self.start_migration(&job, &vm).await,
            // A migration's step the reconciler found written but not sent.
            JobKind::MigrateIn | JobKind::MigrateOut | JobKind::AbortIncoming => {
                return self.dispatch(&job).await
            }
            JobKind::Restart => return self.restart(&job, &vm).await,
            JobKind::Resume => return self.resume(&job, &vm).await,
            // To the host the job names (the one that came back, or the standby's), not the
            // VM's.
            JobKind::Evict | JobKind::Standby => {
                let action = match job.kind {
                    JobKind::Standby => {
                        let Some(image) = self.db.image(&vm.image).await? else {
                            self.fail_job(&job, &format!("image {} does not exist", vm.image))
                                .await;
                            return Ok(());
                        };
                        let disk = vm.disk_path.clone();
                        Action::Standby(self.vm_spec(&vm, image, disk).await?)
                    }
                    _ => Action::Evict(vm.id.clone()),
                };
                self.send_to_host(&job.host_id, &job.id, action).await?;
                self.db
                    .transition_job(&job.id, &[JobState::Pending], JobState::Running, "")
                    .await?;
                return Ok(());
            }
            _ => {}
        }
        if job.kind == JobKind::Delete && vm.host_id.is_empty() {
            // Never placed (its create failed, or has not been handled yet): no host to ask.
            // The create, when it comes, finds the VM deleted and does nothing.
            let suspended = matches!(vm.state, VmState::Suspended | VmState::PendingResume);
            if self.db.delete_unplaced_vm(&vm.id).await? {
                if suspended {
                    // Its disk copy and suspended state go with it (the image's disk stays).
                    let dir = self.vm_dir(&vm.id)?;
                    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                        tracing::warn!(vm = vm.id, dir = %dir.display(), error = %e, "cannot remove a deleted VM's files");
                    }
                }
                if self
                    .db
                    .transition_job(&job.id, &[JobState::Pending], JobState::Done, "")
                    .await?
                {
                    self.job_ended(&job, JobState::Done);
                }
                let detail = if suspended {
                    "suspended, on no host"
                } else {
                    "never placed"
                };
                self.event(EventKind::VmDeleted, "", &vm.id, &job.id, detail)
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
            match placement::choose(
                &self.db,
                &self.policy,
                vm.vcpus,
                vm.memory_mib,
                placement::Among::for_vm(&vm, None, None),
            )
            .await?
            {
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

    /// What a VM is built from, as its host's agent needs it: with the scaling watch of the
    /// policy that applies to it, and its checkpoint interval if it is to be resumed on failure.
    async fn vm_spec(
        &self,
        vm: &db::Vm,
        image: db::Image,
        disk: String,
    ) -> Result<vim_proto::VmSpec> {
        let scaling = self
            .db
            .scaling_policy_for(vm)
            .await?
            .and_then(|p| p.watch());
        Ok(vim_proto::VmSpec {
            vm_id: vm.id.clone(),
            vcpus: vm.vcpus as u32,
            memory_mib: vm.memory_mib as u64,
            kernel: image.kernel,
            initrd: image.initrd,
            cmdline: image.cmdline,
            disk,
            mac: vm.mac.clone(),
            max_vcpus: vm.vcpu_ceiling() as u32,
            max_memory_mib: vm.memory_ceiling() as u64,
            scaling,
            checkpoint_ms: vm.checkpoint_interval(),
            resume_checkpoint: false,
        })
    }

    /// The host command that carries out `job` on `vm`, placed on `host_id`. Safe to call again
    /// for the same job (a resend): the disk copy is made once.
    pub(super) async fn host_action(
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
                Action::Create(self.vm_spec(vm, image, disk).await?)
            }
            JobKind::Start => Action::Start(vm.id.clone()),
            JobKind::Stop => Action::Stop(vim_proto::StopVm {
                vm_id: vm.id.clone(),
                timeout_ms: 10_000,
            }),
            JobKind::Delete => Action::Delete(vm.id.clone()),
            // Nothing to send for a migration itself: its steps carry the commands.
            JobKind::Migrate => return Ok(Step::Later),
            JobKind::MigrateIn => {
                let Some(image) = self.db.image(&vm.image).await? else {
                    return Ok(Step::Refuse(format!("image {} does not exist", vm.image)));
                };
                Action::MigrateIn(vim_proto::MigrateIn {
                    vm: Some(self.vm_spec(vm, image, vm.disk_path.clone()).await?),
                    wait_ms: super::migrations::INCOMING_WAIT_MS,
                })
            }
            JobKind::MigrateOut => {
                let parent = self.db.job(&job.parent_id).await?;
                let p = parent
                    .as_ref()
                    .map(super::migrations::MigrateParams::of)
                    .unwrap_or_default();
                Action::MigrateOut(vim_proto::MigrateOut {
                    vm_id: vm.id.clone(),
                    downtime_ms: p.downtime_ms,
                    handover_timeout_ms: super::migrations::HANDOVER_TIMEOUT_MS,
                })
            }
            JobKind::AbortIncoming => Action::AbortIncoming(vm.id.clone()),
            // Its disk copy exists already: the VM boots from it, as it was.
            JobKind::Restart => {
                let Some(image) = self.db.image(&vm.image).await? else {
                    return Ok(Step::Refuse(format!("image {} does not exist", vm.image)));
                };
                let mut spec = self.vm_spec(vm, image, vm.disk_path.clone()).await?;
                // The guest goes on from its newest checkpoint, if it has a usable one (its
                // standby's host promotes the standby).
                spec.resume_checkpoint =
                    matches!(vm.ha, db::HaPolicy::Resume | db::HaPolicy::Standby);
                Action::Create(spec)
            }
            JobKind::Evict => Action::Evict(vm.id.clone()),
            JobKind::Standby => return Ok(Step::Refuse("sent by the job worker".into())),
            JobKind::SetScaling => Action::SetScaling(vim_proto::SetScaling {
                vm_id: vm.id.clone(),
                scaling: self
                    .db
                    .scaling_policy_for(vm)
                    .await?
                    .and_then(|p| p.watch()),
            }),
            JobKind::SetCheckpoints => Action::SetCheckpoints(vim_proto::SetCheckpoints {
                vm_id: vm.id.clone(),
                checkpoint_ms: vm.checkpoint_interval(),
            }),
            JobKind::Suspend => Action::Suspend(vm.id.clone()),
            JobKind::Resume => {
                let Some(image) = self.db.image(&vm.image).await? else {
                    return Ok(Step::Refuse(format!("image {} does not exist", vm.image)));
                };
                Action::Resume(self.vm_spec(vm, image, vm.disk_path.clone()).await?)
            }
            JobKind::Resize => {
                let p: ResizeParams = match serde_json::from_str(&job.params) {
                    Ok(p) => p,
                    Err(e) => return Ok(Step::Refuse(format!("bad resize parameters: {e}"))),
                };
                Action::Resize(vim_proto::ResizeVm {
                    vm_id: vm.id.clone(),
                    vcpus: p.vcpus,
                    memory_mib: p.memory_mib.unwrap_or(0),
                    clamp_memory: p.clamp_memory,
                })
            }
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
    pub(super) async fn resend(self: &Arc<Self>, job: &db::Job) -> Result<()> {
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
}

/// What a resize job asks for.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ResizeParams {
    pub vcpus: u32,
    /// The memory wanted (MiB); absent: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The scaler's request: memory below what the VM booted with (which it cannot give back)
    /// is brought up to that instead of refusing the resize.
    #[serde(default)]
    pub clamp_memory: bool,
}

/// What handling a job does next.
pub(super) enum Step {
    Send(Action),
    /// Not yet: work for it is under way elsewhere (a disk copy), which handles it again.
    Later,
    Refuse(String),
}

/// How [`Vimd::send_placed`] went.
pub(super) enum Placed {
    /// The command is on its way (or, NATS down, the reconciler sends it again).
    Sent,
    /// Work for it is under way elsewhere, which handles it again.
    Later,
    /// The VM was not where the job found it (it changed meanwhile): nothing done.
    Changed,
    /// The command was refused: the VM records its new host; the caller undoes what it must.
    Refused(String),
}

impl Placed {
    /// Why the job fails, if it does.
    pub(super) fn failure(&self) -> Option<&str> {
        match self {
            Placed::Changed => Some("the VM changed meanwhile"),
            Placed::Refused(why) => Some(why),
            Placed::Sent | Placed::Later => None,
        }
    }
}

impl Vimd {
    /// A claimed job that places its VM anew (a restart, a resume): records the VM on `host`
    /// (moved from `from`, '' for none), then sends the job's command there.
    pub(super) async fn send_placed(
        self: &Arc<Self>,
        job: &db::Job,
        vm: &db::Vm,
        from: &str,
        host: &str,
    ) -> Result<Placed> {
        if !self.db.move_vm(&vm.id, from, host).await? {
            return Ok(Placed::Changed);
        }
        let vm = db::Vm {
            host_id: host.to_string(),
            ..vm.clone()
        };
        let action = match self.host_action(job, &vm, host).await? {
            Step::Send(a) => a,
            Step::Later => return Ok(Placed::Later),
            Step::Refuse(why) => return Ok(Placed::Refused(why)),
        };
        self.db.assign_job_host(&job.id, host).await?;
        if let Err(e) = self.send_to_host(host, &job.id, action).await {
            tracing::warn!(job = job.id, kind = job.kind.as_str(), error = %e, "command not sent yet");
        }
        Ok(Placed::Sent)
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
