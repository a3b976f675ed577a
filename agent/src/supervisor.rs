//! One supervisor task per VM (the actor shape of mini-redis): the task owns its [`Vm`], takes
//! that VM's commands from a channel one at a time, in the order they came, and between commands
//! watches the VMM (has it exited?) and refreshes the VM's report. Commands for different VMs
//! run at once; the heartbeat reads the latest reports and never waits for a command. Every
//! blocking step (processes, files, the VMM's socket) runs on a blocking thread, never on the
//! runtime's. One shutdown signal stops every supervisor (their VMMs keep running: a restarted
//! agent re-adopts them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use vim_proto::host_command::Action;
use vim_proto::{EventKind, HostEvent, MigrationResult, VmReport, VmSpec, VmState};

use crate::lock;
use crate::vms::{Dirs, Vm};

/// What a command did: the event kind, the VM, the outcome, and the VM's report after it.
pub struct Outcome {
    pub kind: EventKind,
    pub vm_id: String,
    pub result: Result<(), String>,
    pub report: Option<VmReport>,
    /// The answer to a `migrate_out`: how the migration went (also when it failed).
    pub migration: Option<MigrationResult>,
    /// The answer to a create with `resume_checkpoint`: what the guest resumed from.
    pub checkpoint: Option<vim_proto::CheckpointResume>,
}

/// A command for one VM's supervisor, answered on `reply`.
struct Op {
    action: Action,
    reply: oneshot::Sender<Outcome>,
}

/// How to reach a VM's supervisor, and its latest report.
struct Handle {
    tx: mpsc::UnboundedSender<Op>,
    report: Arc<Mutex<VmReport>>,
}

/// A VMM that exited on its own: reported as `VM_Failure` by the caller.
pub struct Exit {
    pub vm_id: String,
    pub why: String,
    pub report: VmReport,
}

/// What a supervisor tells the agent unasked, for it to report as a host event.
pub enum Notice {
    /// `VM_Failure`.
    Exited(Exit),
    /// `VM_Unreachable` or `VM_Reachable`: the guest's heartbeat stopped, or came back.
    Reachability {
        report: VmReport,
        change: crate::probe::Change,
    },
    /// `VM_Migration_Progress`: where an outgoing migration is.
    Migrating {
        vm_id: String,
        progress: vmm_api::MigrationProgress,
    },
    /// `Scale_Up_Requested` or `Scale_Down_Requested`: the VM's CPU and memory use over its
    /// policy's window.
    Scale {
        vm_id: String,
        request: crate::scaling::Request,
        vcpus: u32,
    },
}

/// The host's VMs: one supervisor each.
pub struct Host {
    dirs: Arc<Dirs>,
    vms: Arc<Mutex<HashMap<String, Handle>>>,
    exits: mpsc::UnboundedSender<Notice>,
    every: Duration,
    probe_misses: u32,
    shutdown: watch::Receiver<bool>,
}

impl Host {
    /// Supervises the VMs recorded in the state directory (re-adopting running VMMs). VMMs that
    /// exit on their own are sent to `exits`; `every` is how often each supervisor looks, and
    /// `probe_misses` how many looks without a guest heartbeat make a VM unreachable.
    pub async fn start(
        dirs: Arc<Dirs>,
        every: Duration,
        probe_misses: u32,
        exits: mpsc::UnboundedSender<Notice>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Host> {
        let d = dirs.clone();
        let vms = tokio::task::spawn_blocking(move || Vm::load_all(&d)).await??;
        let host = Host {
            dirs,
            vms: Default::default(),
            exits,
            every,
            probe_misses,
            shutdown,
        };
        for vm in vms {
            let id = vm.id().to_string();
            host.spawn(id, Some(vm));
        }
        Ok(host)
    }

    pub fn dirs(&self) -> &Arc<Dirs> {
        &self.dirs
    }

    /// Every VM's latest report, without waiting for any of them.
    pub fn reports(&self) -> Vec<VmReport> {
        lock(&self.vms)
            .values()
            .map(|h| lock(&h.report).clone())
            .collect()
    }

    /// Fencing, as a second guard behind the VMMs' own: kills every VMM this host runs (each
    /// checked to be a vmm process). Their supervisors see them gone and report them failed.
    /// Returns the pids of those it killed.
    pub fn fence(&self) -> Vec<u32> {
        self.reports()
            .iter()
            .map(|r| r.pid)
            .filter(|pid| crate::vms::kill_vmm(*pid))
            .collect()
    }

    /// Queues a command behind the earlier ones for the same VM; the receiver gets its outcome.
    /// Must be called in the order the commands arrived (it does not wait).
    pub fn submit(&self, action: Action) -> oneshot::Receiver<Outcome> {
        let (reply, rx) = oneshot::channel();
        let id = crate::vms::action_vm(&action).to_string();
        // The id becomes a path and a map key: refused before anything is done with it.
        if let Err(e) = vim_proto::check_id("VM id", &id) {
            tracing::warn!(error = %e, "command refused");
            let _ = reply.send(refused(e.to_string()));
            return rx;
        }
        // Looked up first: the registry's lock must be free again before `spawn` takes it.
        let known = lock(&self.vms).get(&id).map(|h| h.tx.clone());
        let handle = match known {
            Some(tx) => Some(tx),
            // A VM this host has no supervisor for: only a create (or a migration coming in, or
            // a resume) makes one.
            None if matches!(
                action,
                Action::Create(_) | Action::MigrateIn(_) | Action::Resume(_) | Action::Standby(_)
            ) =>
            {
                Some(self.spawn(id.clone(), None))
            }
            None => None,
        };
        let op = Op { action, reply };
        match handle {
            Some(tx) => {
                if let Err(mpsc::error::SendError(op)) = tx.send(op) {
                    let _ = op
                        .reply
                        .send(no_vm(&op.action, "its supervisor has stopped"));
                }
            }
            None => {
                let dirs = self.dirs.clone();
                tokio::spawn(async move {
                    let out = match &op.action {
                        // Deleting what is not here: make sure it never comes back.
                        Action::Delete(id) => {
                            let id2 = id.clone();
                            let r = tokio::task::spawn_blocking(move || dirs.mark_deleted(&id2))
                                .await
                                .map_err(anyhow::Error::from)
                                .and_then(|r| r);
                            Outcome {
                                kind: EventKind::VmDeleted,
                                vm_id: id.clone(),
                                result: r.map_err(|e| format!("{e:#}")),
                                report: Some(deleted_report(id)),
                                migration: None,
                                checkpoint: None,
                            }
                        }
                        // Moved away, and the answer was lost with the agent that saw it go.
                        Action::MigrateOut(m) if dirs.moved(&m.vm_id).is_some() => {
                            let o = dirs.moved(&m.vm_id);
                            Outcome {
                                kind: EventKind::VmMigrated,
                                vm_id: m.vm_id.clone(),
                                result: Ok(()),
                                report: Some(deleted_report(&m.vm_id)),
                                migration: o.as_ref().map(migration_result),
                                checkpoint: None,
                            }
                        }
                        // Suspended already, and the answer was lost with the agent that did it.
                        Action::Suspend(id)
                            if dirs
                                .suspend_dir(id)
                                .join(vmm_api::SNAPSHOT_STATE_FILE)
                                .is_file() =>
                        {
                            Outcome {
                                kind: EventKind::VmSuspended,
                                vm_id: id.clone(),
                                result: Ok(()),
                                report: Some(state_report(id, VmState::Suspended)),
                                migration: None,
                                checkpoint: None,
                            }
                        }
                        // Nothing waits here for that VM: already aborted (a redelivery), or
                        // its VMM gave up on its own; or, for an eviction, not here at all.
                        Action::AbortIncoming(id) | Action::Evict(id) => Outcome {
                            kind: event_kind(&op.action),
                            vm_id: id.clone(),
                            result: Ok(()),
                            report: Some(deleted_report(id)),
                            migration: None,
                            checkpoint: None,
                        },
                        a => no_vm(a, "no such VM on this host"),
                    };
                    let _ = op.reply.send(out);
                });
            }
        }
        rx
    }

    /// Starts VM `id`'s supervisor; returns its channel.
    fn spawn(&self, id: String, vm: Option<Vm>) -> mpsc::UnboundedSender<Op> {
        let (tx, rx) = mpsc::unbounded_channel();
        let report = Arc::new(Mutex::new(VmReport {
            vm_id: id.clone(),
            state: vm
                .as_ref()
                .map_or(VmState::Creating, |v| v.record.state)
                .into(),
            pid: vm.as_ref().map_or(0, |v| v.record.pid),
            seq: crate::vms::next_report_seq(),
            ..Default::default()
        }));
        lock(&self.vms).insert(
            id.clone(),
            Handle {
                tx: tx.clone(),
                report: report.clone(),
            },
        );
        let s = Supervisor {
            id,
            vm,
            dirs: self.dirs.clone(),
            report,
            registry: self.vms.clone(),
            exits: self.exits.clone(),
            scaling: crate::scaling::Watch::default(),
            probe: Default::default(),
            probe_misses: self.probe_misses,
            checkpoints: None,
            resumed: None,
        };
        tokio::spawn(s.run(rx, self.every, self.shutdown.clone()));
        tx
    }
}

fn deleted_report(id: &str) -> VmReport {
    state_report(id, VmState::Deleted)
}

/// A report of a VM that no longer runs here: its state only.
fn state_report(id: &str, state: VmState) -> VmReport {
    VmReport {
        vm_id: id.into(),
        state: state.into(),
        seq: crate::vms::next_report_seq(),
        ..Default::default()
    }
}

fn event_kind(action: &Action) -> EventKind {
    match action {
        Action::Create(_) => EventKind::VmCreated,
        Action::Start(_) => EventKind::VmStarted,
        Action::Stop(_) => EventKind::VmStopped,
        Action::Delete(_) => EventKind::VmDeleted,
        Action::Info(_) => EventKind::VmInfo,
        Action::MigrateIn(_) => EventKind::VmIncomingReady,
        Action::MigrateOut(_) => EventKind::VmMigrated,
        Action::AbortIncoming(_) => EventKind::VmIncomingAborted,
        Action::Evict(_) => EventKind::VmEvicted,
        Action::Resize(_) => EventKind::VmResized,
        Action::Suspend(_) => EventKind::VmSuspended,
        Action::Resume(_) => EventKind::VmResumed,
        Action::SetScaling(_) => EventKind::VmScalingSet,
        Action::SetCheckpoints(_) => EventKind::VmCheckpointsSet,
        Action::Standby(_) => EventKind::VmStandbyReady,
    }
}

fn refused(why: String) -> Outcome {
    Outcome {
        kind: EventKind::CommandRefused,
        vm_id: String::new(),
        result: Err(why),
        report: None,
        migration: None,
        checkpoint: None,
    }
}

fn no_vm(action: &Action, why: &str) -> Outcome {
    let id = crate::vms::action_vm(action).to_string();
    Outcome {
        kind: event_kind(action),
        result: Err(format!("VM {id}: {why}")),
        report: Some(deleted_report(&id)),
        vm_id: id,
        migration: None,
        checkpoint: None,
    }
}

struct Supervisor {
    id: String,
    /// None until a create has made the VM's record.
    vm: Option<Vm>,
    dirs: Arc<Dirs>,
    report: Arc<Mutex<VmReport>>,
    registry: Arc<Mutex<HashMap<String, Handle>>>,
    exits: mpsc::UnboundedSender<Notice>,
    /// The VM's CPU use against its scaling policy's thresholds.
    scaling: crate::scaling::Watch,
    /// The guest's heartbeat.
    probe: crate::probe::Probe,
    probe_misses: u32,
    /// The VM's checkpoints (docs/checkpoint.md): their interval and timer, when it has them.
    checkpoints: Option<(u32, tokio::time::Interval)>,
    /// What the last create resumed the guest from, for its answer.
    resumed: Option<vim_proto::CheckpointResume>,
}

/// The next tick of the checkpoint timer; never without one.
async fn next_checkpoint(t: &mut Option<(u32, tokio::time::Interval)>) {
    match t {
        Some((_, i)) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Supervisor {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Op>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = loop {
            tokio::select! {
                op = rx.recv() => {
                    let Some(op) = op else { break "its supervisor has stopped" };
                    let out = self.apply(op.action).await;
                    // Out of the registry before the answer goes: the next command for this VM
                    // (a create after a delete, a migration coming back) finds no stale
                    // supervisor and gets a new one.
                    let gone = self.vm.as_ref().is_some_and(Vm::gone);
                    if gone {
                        self.deregister();
                    }
                    let _ = op.reply.send(out);
                    if gone {
                        break "it is no longer on this host";
                    }
                    self.set_checkpoint_timer();
                }
                _ = next_checkpoint(&mut self.checkpoints) => self.checkpoint().await,
                _ = tick.tick() => {
                    self.watch().await;
                    if self.vm.as_ref().is_some_and(Vm::gone) {
                        break "it is no longer on this host";
                    }
                }
                _ = shutdown.changed() => break "the agent is shutting down",
            }
        };
        self.deregister();
        // Commands queued behind the last one get an answer, not silence.
        rx.close();
        while let Ok(op) = rx.try_recv() {
            let _ = op.reply.send(no_vm(&op.action, why));
        }
    }

    /// Removes this supervisor from the host's registry: only its own entry (a later create may
    /// have made a new one).
    fn deregister(&self) {
        let mut reg = lock(&self.registry);
        if reg
            .get(&self.id)
            .is_some_and(|h| Arc::ptr_eq(&h.report, &self.report))
        {
            reg.remove(&self.id);
        }
    }

    /// Runs `f` on the VM on a blocking thread; None if there is no VM yet or the thread died
    /// (then the VM is dropped here; its record on disk stays, for the next agent to adopt).
    async fn blocking<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Vm) -> T + Send + 'static,
    ) -> Option<T> {
        let mut vm = self.vm.take()?;
        match tokio::task::spawn_blocking(move || {
            let t = f(&mut vm);
            (vm, t)
        })
        .await
        {
            Ok((vm, t)) => {
                self.vm = Some(vm);
                Some(t)
            }
            Err(e) => {
                tracing::error!(vm = self.id, error = %e, "a VM's blocking step failed");
                None
            }
        }
    }

    async fn apply(&mut self, action: Action) -> Outcome {
        let kind = event_kind(&action);
        let id = self.id.clone();
        let dirs = self.dirs.clone();
        let a = action.clone();
        let checked = tokio::task::spawn_blocking(move || dirs.check_command(&a))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        if let Err(e) = checked {
            tracing::warn!(vm = id, error = %e, "command refused");
            return refused(format!("{e:#}"));
        }
        if matches!(action, Action::MigrateIn(_)) && self.vm.as_ref().is_some_and(Vm::is_standby) {
            // The VM moves to this host: its standby here gives way (vimd places another).
            if let Some(Err(e)) = self.blocking(|vm| vm.evict()).await {
                return refused(format!("cannot stop the standby here: {e:#}"));
            }
            self.vm = None;
        }
        if self.vm.is_none() {
            let made = match &action {
                Action::Create(spec) => Some(self.create(spec.clone(), None).await),
                Action::Resume(spec) => Some(self.resume(spec.clone()).await),
                Action::Standby(spec) => Some(self.standby(spec.clone()).await),
                Action::MigrateIn(m) => Some(match &m.vm {
                    Some(spec) => {
                        let wait = Duration::from_millis(m.wait_ms);
                        self.create(spec.clone(), Some(wait)).await
                    }
                    None => Err("no VM in the command".into()),
                }),
                _ => None,
            };
            if let Some(Err(e)) = made {
                return Outcome {
                    kind,
                    vm_id: id,
                    result: Err(e),
                    report: Some(lock(&self.report).clone()),
                    migration: None,
                    checkpoint: None,
                };
            }
            if matches!(
                action,
                Action::MigrateIn(_) | Action::Resume(_) | Action::Standby(_)
            ) {
                // Its VMM was started with the record: ready (a resumed VM runs).
                let report = self.blocking(|vm| vm.report()).await;
                if let Some(r) = &report {
                    *lock(&self.report) = r.clone();
                }
                return Outcome {
                    kind,
                    vm_id: id,
                    result: Ok(()),
                    report,
                    migration: None,
                    checkpoint: None,
                };
            }
        }
        let op = action.clone();
        let notices = self.exits.clone();
        let r = self
            .blocking(move |vm| {
                let mut migration = None;
                let mut promoted = None;
                let r = match &op {
                    // A restart onto the host that keeps the VM's standby: promoted.
                    Action::Create(spec) if vm.is_standby() && spec.resume_checkpoint => vm
                        .promote_or_resume()
                        .map(|r| promoted = Some(r))
                        .and_then(|()| vm.start()),
                    Action::Create(_) | Action::Start(_) if vm.is_standby() => {
                        Err(anyhow::anyhow!(
                            "only a standby of VM {} is on this host: a restart with \
                         resume_checkpoint promotes it",
                            vm.id()
                        ))
                    }
                    Action::Create(_) | Action::Start(_) => vm.start(),
                    // Here already (a redelivery) as a standby, or running here.
                    Action::Standby(_) if vm.is_standby() => Ok(()),
                    Action::Standby(_) => Err(anyhow::anyhow!(
                        "VM {} runs on this host: it cannot be its own standby",
                        vm.id()
                    )),
                    // Here already: a redelivered resume, or a VM that never left.
                    Action::Resume(_) => Ok(()),
                    Action::Suspend(_) => vm.suspend().map(|done| {
                        tracing::info!(
                            vm = vm.id(),
                            ms = done.ms,
                            memory_bytes = done.memory_bytes,
                            "suspended"
                        );
                    }),
                    Action::Stop(s) => vm.stop(Duration::from_millis(s.timeout_ms)),
                    Action::Delete(_) => vm.delete(),
                    Action::Info(_) => Ok(()),
                    Action::MigrateIn(_) => vm.expect_incoming(),
                    Action::MigrateOut(m) => {
                        let progress = |p| {
                            let _ = notices.send(Notice::Migrating {
                                vm_id: m.vm_id.clone(),
                                progress: p,
                            });
                        };
                        match vm.migrate_out(m.downtime_ms, m.handover_timeout_ms, &progress) {
                            Ok(o) => {
                                let done = o.status == vmm_api::MigrationStatus::Completed;
                                let why = o.error.clone().unwrap_or_else(|| {
                                    format!("the migration ended {:?}", o.status)
                                });
                                migration = Some(migration_result(&o));
                                if done {
                                    Ok(())
                                } else {
                                    Err(anyhow::anyhow!(why))
                                }
                            }
                            Err(e) => Err(anyhow::anyhow!(e)),
                        }
                    }
                    Action::AbortIncoming(_) => vm.abort_incoming(),
                    Action::Evict(_) => vm.evict(),
                    Action::Resize(r) => vm.resize(r),
                    Action::SetScaling(s) => vm.set_scaling(s.scaling.as_ref()),
                    Action::SetCheckpoints(s) => vm.set_checkpoints(s.checkpoint_ms),
                };
                let report = match (&op, vm.gone(), &r) {
                    // Its state is on shared storage now, not on this host.
                    (Action::Suspend(_), true, Ok(())) => state_report(vm.id(), VmState::Suspended),
                    (_, true, _) => deleted_report(vm.id()),
                    _ => vm.report(),
                };
                (r.map_err(|e| format!("{e:#}")), report, migration, promoted)
            })
            .await;
        let (result, report, migration) = match r {
            Some((result, report, migration, promoted)) => {
                if promoted.is_some() {
                    self.resumed = promoted;
                }
                (result, report, migration)
            }
            None => (
                Err(format!("VM {id}: no such VM on this host")),
                deleted_report(&id),
                None,
            ),
        };
        *lock(&self.report) = report.clone();
        Outcome {
            kind,
            vm_id: id,
            result,
            report: Some(report),
            migration,
            // Only a create that resumed (or tried to) says from what.
            checkpoint: if matches!(action, Action::Create(_)) {
                self.resumed.take()
            } else {
                None
            },
        }
    }

    /// Makes the VM's record with a VMM restoring its suspended state.
    async fn resume(&mut self, spec: VmSpec) -> Result<(), String> {
        let dirs = self.dirs.clone();
        match tokio::task::spawn_blocking(move || Vm::create_resumed(&dirs, &spec)).await {
            Ok(Ok(vm)) => {
                self.vm = Some(vm);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Makes the VM's record with a standby VMM following its checkpoints.
    async fn standby(&mut self, spec: VmSpec) -> Result<(), String> {
        let dirs = self.dirs.clone();
        match tokio::task::spawn_blocking(move || Vm::create_standby(&dirs, &spec)).await {
            Ok(Ok(vm)) => {
                self.vm = Some(vm);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The checkpoint timer follows the VM's interval (a VM created, moved in, or forgotten).
    fn set_checkpoint_timer(&mut self) {
        let every = self.vm.as_ref().map_or(0, |v| v.record.spec.checkpoint_ms);
        if self.checkpoints.as_ref().map(|(ms, _)| *ms) == Some(every) {
            return;
        }
        self.checkpoints = (every > 0).then(|| {
            let period = Duration::from_millis(u64::from(every));
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            // A checkpoint that takes longer than the interval delays the next; none pile up.
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (every, i)
        });
    }

    /// Writes a checkpoint of the VM if it runs here. A failure is logged; the previous
    /// checkpoint stays the one to resume from.
    async fn checkpoint(&mut self) {
        let id = self.id.clone();
        match self.blocking(|vm| vm.checkpoint()).await.flatten() {
            Some(Ok(done)) => tracing::debug!(
                vm = id,
                seq = done.seq,
                pause_ms = done.pause_ms,
                total_ms = done.total_ms,
                bytes = done.bytes_written,
                "checkpoint"
            ),
            Some(Err(e)) => tracing::warn!(vm = id, error = %e, "checkpoint failed"),
            None => {}
        }
    }

    /// Makes the VM's record: a VM to start (`incoming` None), or one whose VMM waits (that
    /// long at most) for a migration's handover. A create that asks for it resumes the VM from
    /// its newest checkpoint instead (what it resumed from is kept for the answer).
    async fn create(&mut self, spec: VmSpec, incoming: Option<Duration>) -> Result<(), String> {
        let dirs = self.dirs.clone();
        let made = tokio::task::spawn_blocking(move || match incoming {
            None if spec.resume_checkpoint => {
                Vm::create_from_checkpoint(&dirs, &spec).map(|(vm, r)| (vm, Some(r)))
            }
            None => Vm::create(&dirs, &spec).map(|vm| (vm, None)),
            Some(wait) => Vm::create_incoming(&dirs, &spec, wait).map(|vm| (vm, None)),
        });
        match made.await {
            Ok(Ok((vm, resumed))) => {
                self.vm = Some(vm);
                self.resumed = resumed;
                Ok(())
            }
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Between commands: a VMM that exited is reported once; the report is refreshed.
    async fn watch(&mut self) {
        let misses = self.probe_misses;
        let mut probe = std::mem::take(&mut self.probe);
        let Some((exited, report, scaling, probe, reachability)) = self
            .blocking(move |vm| {
                let (exited, report) = (vm.exited(), vm.report());
                let reachability =
                    if exited.is_none() && report.state() == vim_proto::VmState::Running {
                        probe.poll(&vm.record.console, misses)
                    } else {
                        probe.pause();
                        None
                    };
                (exited, report, vm.record.spec.scaling, probe, reachability)
            })
            .await
        else {
            return;
        };
        self.probe = probe;
        *lock(&self.report) = report.clone();
        if let Some(change) = reachability {
            tracing::warn!(vm = self.id, ?change, "guest reachability changed");
            let _ = self.exits.send(Notice::Reachability {
                report: report.clone(),
                change,
            });
        }
        // Only a running VM's use counts (a VM starting, stopped or moving has none).
        let running = report.state() == vim_proto::VmState::Running && report.vcpus > 0;
        let watch = scaling
            .filter(|_| running)
            .map(vim_proto::ScalingWatch::from);
        let use_ = crate::scaling::Sample {
            cpu_pct: report.cpu_pct / f64::from(report.vcpus.max(1)),
            memory_pct: report.memory_used_pct,
        };
        if let Some(request) = self.scaling.sample(
            watch.as_ref(),
            std::time::Instant::now(),
            use_,
            report.vcpus,
        ) {
            tracing::info!(vm = self.id, ?request, "asking for a resize");
            let _ = self.exits.send(Notice::Scale {
                vm_id: self.id.clone(),
                request,
                vcpus: report.vcpus,
            });
        }
        if let Some(why) = exited {
            tracing::warn!(vm = self.id, why, "VMM exited");
            let _ = self.exits.send(Notice::Exited(Exit {
                vm_id: self.id.clone(),
                why,
                report,
            }));
        }
    }
}

/// The event a command's outcome becomes.
pub fn event(host_id: &str, job_id: &str, o: Outcome) -> HostEvent {
    HostEvent {
        version: vim_proto::PROTOCOL_VERSION,
        host_id: host_id.into(),
        job_id: job_id.into(),
        ok: o.result.is_ok(),
        error: o.result.err().unwrap_or_default(),
        kind: o.kind.into(),
        vm: if o.vm_id.is_empty() { None } else { o.report },
        migration: o.migration,
        progress: None,
        scale: None,
        checkpoint: o.checkpoint,
    }
}

/// The VMM's migration outcome as the protocol carries it.
fn migration_result(o: &vmm_api::MigrationOutcome) -> MigrationResult {
    MigrationResult {
        status: serde_json::to_value(o.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        downtime_ms: o.downtime_ms.unwrap_or(0.0),
        total_ms: o.total_ms,
        bytes_written: o.bytes_written,
        rounds: o.rounds,
        waiting_for_target: o.waiting_for_target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use vim_proto::StopVm as Stop;

    /// A stand-in for `vmm`: `run` serves its API socket until killed; `shutdown` takes 2 s,
    /// answers and ends the process; `info` is refused (a VMM that cannot say more).
    fn fake_vmm(dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("vmm");
        std::fs::write(
            &p,
            r#"#!/usr/bin/env python3
import json, os, socket, sys, time
args = sys.argv[1:]
path = args[args.index("--api-socket") + 1]
if args[0] != "run":
    sys.exit(2)
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(4)
while True:
    conn, _ = srv.accept()
    for line in conn.makefile("rb"):
        req = json.loads(line)
        if req["command"] == "shutdown":
            time.sleep(2)
            conn.sendall(b'{"ok":true,"result":{"stopped":"graceful"}}\n')
            os.unlink(path)
            sys.exit(0)
        conn.sendall(b'{"ok":false,"error":"not in this stand-in"}\n')
    conn.close()
"#,
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn spec(id: &str, kernel: &std::path::Path) -> Action {
        Action::Create(VmSpec {
            vm_id: id.into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: kernel.to_str().unwrap().into(),
            ..Default::default()
        })
    }

    /// Commands for different VMs run at once and the reports never wait for them; commands for
    /// one VM run in the order they came; a VMM that dies is reported; a deleted VM stays gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vms_are_supervised_apart() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir_all(shared.join("images/tg")).unwrap();
        let kernel = shared.join("images/tg/kernel");
        std::fs::write(&kernel, b"k").unwrap();
        let dirs =
            Arc::new(Dirs::new(&d.path().join("state"), &shared, &fake_vmm(d.path())).unwrap());
        let (exits_tx, mut exits) = mpsc::unbounded_channel();
        let (stop_tx, stop) = watch::channel(false);
        let host = Host::start(dirs, Duration::from_millis(50), 5, exits_tx, stop)
            .await
            .unwrap();
        for id in ["a", "b"] {
            let o = host.submit(spec(id, &kernel)).await.unwrap();
            assert!(o.result.is_ok(), "{:?}", o.result);
            assert_eq!(o.report.unwrap().state(), VmState::Running);
        }

        // A slow stop of a does not hold up b, nor the reports.
        let mut stop_a = host.submit(Action::Stop(Stop {
            vm_id: "a".into(),
            timeout_ms: 0,
        }));
        let info_b = host.submit(Action::Info("b".into())).await.unwrap();
        assert_eq!(info_b.report.unwrap().state(), VmState::Running);
        assert_eq!(host.reports().len(), 2);
        assert!(
            stop_a.try_recv().is_err(),
            "b's command waited for a's stop"
        );
        let o = stop_a.await.unwrap();
        assert!(o.result.is_ok(), "{:?}", o.result);
        assert_eq!(o.report.unwrap().state(), VmState::Stopped);

        // In order for one VM: start, then info sees it running.
        let start_a = host.submit(Action::Start("a".into()));
        let info_a = host.submit(Action::Info("a".into()));
        assert!(start_a.await.unwrap().result.is_ok());
        assert_eq!(
            info_a.await.unwrap().report.unwrap().state(),
            VmState::Running
        );

        // A VMM that dies on its own is reported once.
        let pid = host
            .reports()
            .into_iter()
            .find(|r| r.vm_id == "b")
            .unwrap()
            .pid;
        // SAFETY: kill(2) on the fake VMM this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let Notice::Exited(x) = tokio::time::timeout(Duration::from_secs(10), exits.recv())
            .await
            .expect("no exit reported")
            .unwrap()
        else {
            panic!("not an exit");
        };
        assert_eq!(x.vm_id, "b");
        assert_eq!(x.report.state(), VmState::Failed);

        // Deleted is final; an unknown VM and a bad id are refused.
        let o = host.submit(Action::Delete("a".into())).await.unwrap();
        assert!(o.result.is_ok(), "{:?}", o.result);
        let o = host.submit(spec("a", &kernel)).await.unwrap();
        assert!(o.result.unwrap_err().contains("deleted"));
        let o = host.submit(Action::Start("nope".into())).await.unwrap();
        assert!(o.result.is_err());
        let o = host.submit(Action::Delete("../x".into())).await.unwrap();
        assert_eq!(o.kind, EventKind::CommandRefused);
        assert!(!d.path().join("state/x").exists());

        let _ = stop_tx.send(true);
        let o = host.submit(Action::Delete("b".into())).await;
        // After shutdown a command gets no answer, or one saying the supervisor stopped.
        if let Ok(o) = o {
            assert!(o.result.is_err() || o.kind == EventKind::VmDeleted);
        }
    }
}
