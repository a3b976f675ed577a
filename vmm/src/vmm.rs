//! The control loop: runs a built machine (`builder`, `persist`) to its end. Guest exits, API
//! requests and the migration thread's pause and resume requests arrive on one channel, and this
//! loop alone changes the run state.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{
    self, BalloonStats, BalloonTarget, BootProtocol, Cancelling, Info, MigrationOutcome,
    MigrationPhase, MigrationStatus, Reply, Request, Resized, Response, RunState, Size,
    StateChanged, StopKind, Stopped,
};
use crate::arch::regs;
use crate::config::VmConfig;
use crate::devices::ged::{CPU_HOTPLUG_BIT, POWER_BUTTON_BIT};
use crate::devices::lock;
use crate::devices::power::ExitReason;
use crate::devices::virtio::balloon::{BalloonControl, BALLOON_PAGE};
use crate::devices::virtio::mem::{MemControl, BLOCK_SIZE};
use crate::devices::virtio::mmio::MmioTransport;
use crate::migration::Pausable;
use crate::persist::Components;
use crate::state_roots::StateRoots;

/// Everything the main loop reacts to.
pub enum VmmEvent {
    /// From a device or a vCPU thread, through the [`ExitSignal`] they were given.
    GuestExit(ExitReason),
    Api(Request, Reply),
    /// The migration's outcome, for whoever asked for it.
    MigrationDone(MigrationOutcome),
    /// A handover the target claimed but had not finished when the outcome went out has ended.
    MigrationLate(crate::migrate::Late),
    /// The migration thread asks for the guest to be paused or to run, and waits for the answer.
    Run(RunState, std::sync::mpsc::Sender<Result<(), String>>),
    /// The guest ejected this vCPU (the hotplug controller): its thread can stop.
    VcpuEjected(u8),
    /// A checkpoint ended (docs/checkpoint.md).
    CheckpointDone(Result<api::CheckpointDone, String>),
}

/// How old the guest's memory statistics may be for `info` to show its memory use.
const STATS_MAX_AGE: Duration = Duration::from_secs(5);
/// How often a resize under way looks at the guest's progress.
const RESIZE_POLL: Duration = Duration::from_millis(2);
/// How often the CPU event is raised again while the guest has not acted on it: one raised
/// before the guest's GED driver was up (a guest still booting) is lost, and a scan is harmless.
const RESIZE_RENOTIFY: Duration = Duration::from_secs(1);

/// A built, running VM.
pub struct Machine {
    pub(crate) config: VmConfig,
    pub(crate) parts: Components,
    pub(crate) events: Receiver<VmmEvent>,
    pub(crate) state: RunState,
    pub(crate) started: Instant,
    /// How the guest was started: a boot protocol, or `None` when restored from a snapshot.
    pub(crate) boot_mode: Option<regs::EntryMode>,
    pub(crate) balloon: Option<(Arc<Mutex<MmioTransport>>, Arc<BalloonControl>)>,
    /// The virtio-mem device, when the VM can grow (`--max-memory-mib`).
    pub(crate) mem: Option<(Arc<Mutex<MmioTransport>>, Arc<MemControl>)>,
    pub(crate) migration: Option<Migration>,
    /// Who waits for the checkpoint under way, if one is.
    pub(crate) checkpoint: Option<Reply>,
    /// What the checkpoints so far left behind, for the next one to write only the changes.
    pub(crate) checkpoints: Arc<Mutex<crate::checkpoint::Tracker>>,
    pub(crate) resize: Option<Resize>,
    /// What KVM supports, for vCPUs hot-added later.
    pub(crate) supported_cpuid: kvm_bindings::CpuId,
    pub(crate) events_tx: Sender<VmmEvent>,
    /// Where snapshot and migration requests may point (`--state-root`).
    pub(crate) state_roots: StateRoots,
}

/// A resize under way: answered once the guest has taken (or ejected) every vCPU and plugged (or
/// unplugged) its memory, or at the deadline with how far it got.
pub(crate) struct Resize {
    reply: Reply,
    started: Instant,
    deadline: Instant,
    old: u8,
    target: u8,
    notified: Instant,
    /// The VM's memory before, in MiB.
    old_memory_mib: u64,
    /// The bytes virtio-mem should hold at the end (`None`: memory does not change).
    plugged_target: Option<u64>,
}

/// A live migration under way: who waits for the outcome (nobody once it has gone out while the
/// target still holds the claim), and what the API can see or stop.
pub(crate) struct Migration {
    reply: Option<Reply>,
    progress: Arc<Mutex<api::MigrationProgress>>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// How the VM ended: the process exit status and a description.
pub struct Outcome {
    pub exit_code: i32,
    pub reason: String,
}

impl Machine {
    /// Confines snapshot and migration requests to `roots` (none: anywhere).
    pub fn with_state_roots(mut self, roots: StateRoots) -> Machine {
        self.state_roots = roots;
        self
    }

    fn resume_all(&self) {
        if let Err(e) = self.parts.resume() {
            tracing::error!(error = %e, "a device did not resume");
        }
    }

    fn info(&self) -> Info {
        Info {
            state: self.state,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vcpus: self.parts.vcpus.count() as u32,
            memory_mib: self.memory_mib(),
            boot_protocol: match self.boot_mode {
                Some(regs::EntryMode::Pvh) => BootProtocol::Pvh,
                Some(regs::EntryMode::Linux64) => BootProtocol::Linux64,
                None => BootProtocol::Restored,
            },
            config: serde_json::to_value(&self.config).unwrap_or_default(),
            balloon: self.balloon.as_ref().map(|(_, c)| BalloonTarget {
                target_mib: pages_to_mib(c.target_pages()),
                actual_mib: Some(pages_to_mib(c.actual_pages())),
                used_pct: c.used_pct(STATS_MAX_AGE),
            }),
            migration: self.migration.as_ref().map(|m| lock(&m.progress).clone()),
            standby_seq: None,
        }
    }

    /// Runs until the guest stops or is stopped.
    pub fn run(mut self) -> Outcome {
        // A pending shutdown: when to force it, and who waits for the answer.
        let mut shutdown: Option<(Instant, Reply)> = None;
        loop {
            // Woken by an event, the shutdown's deadline, or to look at a resize's progress.
            let wake = [
                shutdown.as_ref().map(|(deadline, _)| *deadline),
                self.resize.as_ref().map(|_| Instant::now() + RESIZE_POLL),
            ]
            .into_iter()
            .flatten()
            .min();
            let event = match wake {
                Some(at) => {
                    match self
                        .events
                        .recv_timeout(at.saturating_duration_since(Instant::now()))
                    {
                        Ok(e) => Some(e),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            return self.finish(1, "event channel closed".into())
                        }
                    }
                }
                None => match self.events.recv() {
                    Ok(e) => Some(e),
                    Err(_) => return self.finish(1, "event channel closed".into()),
                },
            };
            if shutdown
                .as_ref()
                .is_some_and(|(deadline, _)| Instant::now() >= *deadline)
            {
                if let Some((_, reply)) = shutdown.take() {
                    reply.send_and_flush(Response::ok(&Stopped {
                        stopped: StopKind::Forced,
                    }));
                }
                return self.finish(0, "forced stop after the shutdown timeout".into());
            }
            self.check_resize();
            let Some(event) = event else {
                continue;
            };
            match event {
                VmmEvent::GuestExit(ExitReason::Failed(msg)) => {
                    if let Some((_, reply)) = shutdown.take() {
                        reply.send_and_flush(Response::err(msg.clone()));
                    }
                    return self.finish(1, msg);
                }
                VmmEvent::GuestExit(reason) => {
                    if let Some((_, reply)) = shutdown.take() {
                        reply.send_and_flush(Response::ok(&Stopped {
                            stopped: StopKind::Graceful,
                        }));
                    }
                    return self.finish(reason.exit_code(), format!("guest exit: {reason:?}"));
                }
                VmmEvent::Api(Request::Shutdown { .. }, reply) if self.migration.is_some() => {
                    reply.send(Response::err(
                        "a migration is in progress (cancel it first)",
                    ));
                }
                VmmEvent::Api(Request::Shutdown { timeout_ms }, reply) => {
                    if shutdown.is_some() {
                        reply.send(Response::err("a shutdown is already in progress"));
                        continue;
                    }
                    if self.state == RunState::Paused {
                        // A paused guest cannot react to the button.
                        self.resume_all();
                        self.state = RunState::Running;
                    }
                    if let Err(e) = lock(&self.parts.ged).notify(POWER_BUTTON_BIT) {
                        tracing::warn!(error = %e, "cannot signal the power button");
                    }
                    shutdown = Some((Instant::now() + Duration::from_millis(timeout_ms), reply));
                }
                VmmEvent::MigrationDone(outcome) => {
                    let Some(mut m) = self.migration.take() else {
                        continue;
                    };
                    let Some(reply) = m.reply.take() else {
                        continue;
                    };
                    let completed = outcome.status == MigrationStatus::Completed;
                    let answer = Response::ok(&outcome);
                    if completed {
                        reply.send_and_flush(answer);
                        return self.finish(0, "migrated: the guest runs on the target".into());
                    }
                    tracing::warn!(status = ?outcome.status, error = ?outcome.error, "migration did not complete");
                    reply.send(answer);
                    if outcome.waiting_for_target {
                        // Still a migration (the guest stays paused): nothing may resume or
                        // change the guest meanwhile.
                        self.migration = Some(m);
                    }
                }
                VmmEvent::MigrationLate(late) => {
                    self.migration = None;
                    match late {
                        crate::migrate::Late::Resumed => {
                            return self.finish(
                                0,
                                "migrated: the target resumed the guest late; it runs there".into(),
                            )
                        }
                        crate::migrate::Late::TakenBack(why) => {
                            tracing::warn!(error = %why, "the target gave the guest back; it runs here again");
                        }
                    }
                }
                VmmEvent::Api(Request::MigrateCancel {}, reply) => match &self.migration {
                    Some(m) if m.reply.is_none() => reply.send(Response::err(
                        "the target has claimed the VM: only the target can give it back",
                    )),
                    Some(m) => {
                        m.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                        reply.send(Response::ok(&Cancelling { cancelling: true }));
                    }
                    None => reply.send(Response::err("no migration is in progress")),
                },
                VmmEvent::Run(want, answer) => {
                    let _ = answer.send(self.set_run_state(want));
                }
                VmmEvent::VcpuEjected(index) => self.vcpu_ejected(index),
                VmmEvent::CheckpointDone(result) => {
                    if let Some(reply) = self.checkpoint.take() {
                        reply.send(match result {
                            Ok(done) => Response::ok(&done),
                            Err(e) => Response::err(e),
                        });
                    }
                }
                VmmEvent::Api(Request::Info {}, reply) => reply.send(Response::ok(&self.info())),
                VmmEvent::Api(_, reply) if self.migration.is_some() => {
                    reply.send(Response::err("a migration is in progress"));
                }
                VmmEvent::Api(_, reply) if self.checkpoint.is_some() => {
                    reply.send(Response::err("a checkpoint is in progress"));
                }
                VmmEvent::Api(
                    Request::Migrate {
                        dir,
                        downtime_ms,
                        max_rounds,
                        timeout_ms,
                    },
                    reply,
                ) => {
                    self.start_migration(dir, downtime_ms, max_rounds, timeout_ms, reply);
                }
                VmmEvent::Api(_, reply) if self.resize.is_some() => {
                    reply.send(Response::err("a resize is in progress"));
                }
                VmmEvent::Api(Request::Checkpoint { dir }, reply) => {
                    self.start_checkpoint(dir, reply);
                }
                VmmEvent::Api(
                    Request::Resize {
                        vcpus,
                        memory_mib,
                        timeout_ms,
                    },
                    reply,
                ) => self.start_resize(vcpus, memory_mib, timeout_ms, reply),
                VmmEvent::Api(Request::BalloonStats {}, reply) => self.balloon_stats(reply),
                VmmEvent::Api(req, reply) => {
                    reply.send(self.handle(req));
                }
            }
        }
    }

    /// The one place the run state changes: pausing stops every component (and runs them again
    /// if one cannot stop); running resumes them all, even when one fails to.
    fn set_run_state(&mut self, want: RunState) -> Result<(), String> {
        match want {
            RunState::Paused => {
                self.parts.pause().map_err(|e| e.to_string())?;
                self.state = RunState::Paused;
                Ok(())
            }
            RunState::Running => {
                let r = self.parts.resume().map_err(|e| e.to_string());
                self.state = RunState::Running;
                r
            }
            RunState::Standby => Err("a running VM cannot become a standby".into()),
        }
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Info {} => Response::ok(&self.info()),
            Request::Pause {} => {
                if self.state == RunState::Paused {
                    return Response::err("the VM is already paused");
                }
                match self.set_run_state(RunState::Paused) {
                    Ok(()) => Response::ok(&StateChanged {
                        state: RunState::Paused,
                    }),
                    Err(e) => Response::err(e),
                }
            }
            Request::Resume {} => {
                if self.state == RunState::Running {
                    return Response::err("the VM is not paused");
                }
                self.resume_all();
                self.state = RunState::Running;
                Response::ok(&StateChanged {
                    state: RunState::Running,
                })
            }
            Request::BalloonSet { mib } => {
                let Some((transport, control)) = &self.balloon else {
                    return Response::err("this VM has no balloon (start it with --balloon)");
                };
                if mib > self.memory_mib() {
                    return Response::err(format!(
                        "balloon target {mib} MiB is larger than the VM's memory ({} MiB)",
                        self.memory_mib()
                    ));
                }
                control.set_target_pages((mib << 20).div_ceil(BALLOON_PAGE) as u32);
                lock(transport).config_changed();
                Response::ok(&BalloonTarget {
                    target_mib: mib,
                    actual_mib: None,
                    used_pct: None,
                })
            }
            Request::Migrate { .. } | Request::MigrateCancel {} | Request::Checkpoint { .. } => {
                Response::err("handled by the main loop")
            }
            Request::Snapshot { dir } => match self
                .state_roots
                .check(&dir)
                .map_err(anyhow::Error::from)
                .and_then(|dir| self.snapshot(&dir))
            {
                Ok(v) => Response::ok(&v),
                Err(e) => Response::err(format!("{e:#}")),
            },
            Request::Shutdown { .. } | Request::BalloonStats {} | Request::Resize { .. } => {
                Response::err("handled by the main loop")
            }
            Request::Promote {} => Response::err("this VMM runs its VM: it is no standby"),
        }
    }

    /// Starts the source side of a live migration on a thread of its own; the answer goes out when
    /// it ends (`VmmEvent::MigrationDone`).
    fn start_migration(
        &mut self,
        dir: std::path::PathBuf,
        downtime_ms: u64,
        max_rounds: u32,
        timeout_ms: u64,
        reply: Reply,
    ) {
        if self.state != RunState::Running {
            return reply.send(Response::err(
                "the VM must be running to migrate (resume it first)",
            ));
        }
        let dir = match self.state_roots.check(&dir) {
            Ok(d) => d,
            Err(e) => return reply.send(Response::err(e.to_string())),
        };
        let progress = Arc::new(Mutex::new(api::MigrationProgress::default()));
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The migration reads the dirty logs and turns them off: checkpoints start over.
        lock(&self.checkpoints).forget();
        let run = self.run_control();
        let source = crate::migrate::Source {
            parts: self.parts.clone(),
            config: self.config.clone(),
            run,
            progress: progress.clone(),
            cancel: cancel.clone(),
        };
        let params = crate::migrate::Params {
            dir,
            downtime: Duration::from_millis(downtime_ms),
            max_rounds: max_rounds.max(1),
            handover_timeout: Duration::from_millis(timeout_ms),
        };
        let events = self.events_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let (outcome, claimed) = source.run(&params);
                let _ = events.send(VmmEvent::MigrationDone(outcome));
                if let Some(claimed) = claimed {
                    crate::devices::lock(&source.progress).phase = MigrationPhase::WaitingForTarget;
                    let late = source.watch(claimed);
                    let _ = events.send(VmmEvent::MigrationLate(late));
                }
            });
        match spawned {
            Ok(_) => {
                self.migration = Some(Migration {
                    reply: Some(reply),
                    progress,
                    cancel,
                })
            }
            Err(e) => reply.send(Response::err(format!(
                "cannot start the migration thread: {e}"
            ))),
        }
    }

    /// Lets another thread pause the guest or let it run, through this loop.
    fn run_control(&self) -> crate::migrate::RunControl {
        let tx = self.events_tx.clone();
        Box::new(move |want| {
            let (answer, rx) = std::sync::mpsc::channel();
            let gone = || "the VMM is exiting".to_string();
            tx.send(VmmEvent::Run(want, answer)).map_err(|_| gone())?;
            rx.recv().map_err(|_| gone())?
        })
    }

    /// Writes a checkpoint on a thread of its own (the guest runs meanwhile, but for a short
    /// pause); the answer goes out when it ends (`VmmEvent::CheckpointDone`).
    fn start_checkpoint(&mut self, dir: std::path::PathBuf, reply: Reply) {
        let dir = match self.state_roots.check(&dir) {
            Ok(d) => d,
            Err(e) => return reply.send(Response::err(e.to_string())),
        };
        let (parts, config, run) = (self.parts.clone(), self.config.clone(), self.run_control());
        let running = self.state == RunState::Running;
        let tracker = self.checkpoints.clone();
        let events = self.events_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let src = crate::checkpoint::Source {
                    parts: &parts,
                    config: &config,
                    run: &run,
                    running,
                };
                let r = lock(&tracker).take(&dir, &src);
                if let Err(e) = &r {
                    tracing::warn!(dir = %dir.display(), error = %e, "checkpoint failed");
                }
                let _ = events.send(VmmEvent::CheckpointDone(r.map_err(|e| e.to_string())));
            });
        match spawned {
            Ok(_) => self.checkpoint = Some(reply),
            Err(e) => reply.send(Response::err(format!(
                "cannot start the checkpoint thread: {e}"
            ))),
        }
    }

    fn size(&self) -> Size {
        Size {
            vcpus: self.parts.vcpus.count() as u32,
            memory_mib: self.memory_mib(),
        }
    }

    /// The guest's memory now: boot RAM and what virtio-mem has plugged.
    fn memory_mib(&self) -> u64 {
        let plugged = self.mem.as_ref().map_or(0, |(_, c)| c.plugged_size());
        self.config.memory_mib + (plugged >> 20)
    }

    /// Checks a memory resize to `mib` and returns the bytes virtio-mem must hold for it
    /// (`None`: no change).
    fn plugged_target(&self, mib: Option<u64>) -> Result<Option<u64>, String> {
        let Some(mib) = mib.filter(|m| *m != self.memory_mib()) else {
            return Ok(None);
        };
        let (boot, max) = (self.config.memory_mib, self.config.max_memory_mib);
        if self.mem.is_none() {
            return Err(format!(
                "this VM cannot change its memory: it was started without --max-memory-mib \
                 (it has {boot} MiB)"
            ));
        }
        let max = max.unwrap_or(boot);
        if mib < boot {
            return Err(format!(
                "{mib} MiB is less than the {boot} MiB the VM booted with, which cannot be unplugged"
            ));
        }
        if mib > max {
            return Err(format!(
                "{mib} MiB is more than the VM's maximum, {max} MiB (vmm run --max-memory-mib)"
            ));
        }
        let bytes = (mib - boot) << 20;
        if bytes % BLOCK_SIZE != 0 {
            return Err(format!(
                "{mib} MiB is not {boot} MiB plus a whole number of {} MiB blocks",
                BLOCK_SIZE >> 20
            ));
        }
        Ok(Some(bytes))
    }

    /// Asks virtio-mem's driver to hold `bytes`.
    fn request_memory(&self, bytes: u64) {
        if let Some((transport, control)) = &self.mem {
            control.set_requested_size(bytes);
            lock(transport).config_changed();
        }
    }

    /// Starts a resize: hot-adds vCPUs (each runs, then the guest is told) or asks the guest to
    /// give back the top one (the next once it is ejected). Answered by `check_resize`.
    fn start_resize(
        &mut self,
        vcpus: Option<u32>,
        memory_mib: Option<u64>,
        timeout_ms: u64,
        reply: Reply,
    ) {
        let started = Instant::now();
        if self.state != RunState::Running {
            return reply.send(Response::err(
                "the VM is paused: resume it before resizing (the guest must take part)",
            ));
        }
        let old = self.size();
        let target = match vcpus {
            None => old.vcpus,
            Some(0) => return reply.send(Response::err("a VM needs at least 1 vCPU")),
            Some(n) if n > u32::from(self.config.max_vcpus) => {
                return reply.send(Response::err(format!(
                    "{n} vCPUs is more than the VM's maximum, {} (vmm run --max-vcpus)",
                    self.config.max_vcpus
                )))
            }
            Some(n) => n,
        };
        let plugged_target = match self.plugged_target(memory_mib) {
            Ok(t) => t,
            Err(e) => return reply.send(Response::err(e)),
        };
        // A removal an earlier resize gave up on is not honoured any more: the vCPUs the guest
        // has stay 0..count.
        lock(&self.parts.cpu_hotplug).cancel_removals();
        let (old_n, target_n) = (old.vcpus as u8, target as u8);
        if target_n == old_n && plugged_target.is_none() {
            return reply.send(Response::ok(&Resized {
                old,
                new: old,
                took_ms: 0.0,
            }));
        }
        if let Some(bytes) = plugged_target {
            self.request_memory(bytes);
            tracing::info!(from = old.memory_mib, to = memory_mib, "resizing: memory");
        }
        if target_n > old_n {
            for i in old_n..target_n {
                if let Err(e) = self.add_vcpu(i) {
                    let now = self.parts.vcpus.count();
                    self.config.vcpus = now as u8;
                    if now > usize::from(old_n) {
                        self.notify_cpu_change();
                    }
                    return reply.send(Response::err(format!(
                        "cannot add vCPU {i} ({e}); the VM has {now} vCPUs"
                    )));
                }
            }
            self.config.vcpus = target_n;
        } else if target_n < old_n {
            lock(&self.parts.cpu_hotplug).request_removal(old_n - 1);
        }
        if target_n != old_n {
            self.notify_cpu_change();
            tracing::info!(from = old_n, to = target_n, "resizing: vCPUs");
        }
        self.resize = Some(Resize {
            reply,
            started,
            deadline: started + Duration::from_millis(timeout_ms),
            old: old_n,
            target: target_n,
            notified: Instant::now(),
            old_memory_mib: old.memory_mib,
            plugged_target,
        });
    }

    /// Runs vCPU `index` (created now, or run again if it was removed before) and marks its slot
    /// inserted.
    fn add_vcpu(&mut self, index: u8) -> Result<(), crate::vcpu::VcpuError> {
        if !self.parts.vcpus.readd(index)? {
            let v = crate::vcpu::Vcpu::new(
                &self.parts.vm.fd,
                &self.supported_cpuid,
                index,
                self.config.max_vcpus,
                None,
            )?;
            self.parts.vcpus.add(v)?;
        }
        lock(&self.parts.cpu_hotplug).insert(index);
        Ok(())
    }

    fn notify_cpu_change(&self) {
        if let Err(e) = lock(&self.parts.ged).notify(CPU_HOTPLUG_BIT) {
            tracing::warn!(error = %e, "cannot signal the CPU hotplug event");
        }
    }

    /// The guest ejected vCPU `index`: its thread stops, and a resize under way asks for the
    /// next one.
    fn vcpu_ejected(&mut self, index: u8) {
        if let Err(e) = self.parts.vcpus.remove(index) {
            tracing::error!(vcpu = index, error = %e, "an ejected vCPU did not stop");
        }
        let count = self.parts.vcpus.count() as u8;
        self.config.vcpus = count;
        tracing::info!(vcpu = index, vcpus = count, "vCPU ejected by the guest");
        if let Some(r) = &self.resize {
            if r.target < count {
                lock(&self.parts.cpu_hotplug).request_removal(count - 1);
                self.notify_cpu_change();
                if let Some(r) = &mut self.resize {
                    r.notified = Instant::now();
                }
            }
        }
    }

    /// Answers the resize under way once the guest has done its part, or at its deadline.
    fn check_resize(&mut self) {
        let Some(r) = &self.resize else {
            return;
        };
        let count = self.parts.vcpus.count() as u8;
        let cpus_done = if r.target > r.old {
            let c = lock(&self.parts.cpu_hotplug);
            (r.old..r.target).all(|i| !c.slot(i).inserting)
        } else {
            count == r.target
        };
        let plugged = self.mem.as_ref().map_or(0, |(_, c)| c.plugged_size());
        let memory_done = r.plugged_target.is_none_or(|t| t == plugged);
        let done = cpus_done && memory_done;
        if !done && Instant::now() < r.deadline {
            if !cpus_done && r.notified.elapsed() >= RESIZE_RENOTIFY {
                self.notify_cpu_change();
                if let Some(r) = &mut self.resize {
                    r.notified = Instant::now();
                }
            }
            return;
        }
        let Some(r) = self.resize.take() else {
            return;
        };
        let waited = r.deadline.duration_since(r.started).as_millis();
        let answer = if done {
            Response::ok(&Resized {
                old: Size {
                    vcpus: u32::from(r.old),
                    memory_mib: r.old_memory_mib,
                },
                new: self.size(),
                took_ms: r.started.elapsed().as_secs_f64() * 1000.0,
            })
        } else if !memory_done {
            // The guest stops where it is (it may hold memory it cannot give up): the VM keeps
            // what it has, and no change goes on behind the caller's back.
            self.request_memory(plugged);
            if !cpus_done && r.target < r.old {
                lock(&self.parts.cpu_hotplug).cancel_removals();
            }
            let want = r.plugged_target.unwrap_or(0) >> 20;
            let (had, now) = (r.old_memory_mib, self.memory_mib());
            let verb = if want + self.config.memory_mib > had {
                "plugged"
            } else {
                "unplugged"
            };
            Response::err(format!(
                "the guest {verb} {} of {} MiB within {waited} ms; the VM has {now} MiB{}",
                now.abs_diff(had),
                (want + self.config.memory_mib).abs_diff(had),
                if cpus_done {
                    String::new()
                } else {
                    format!(" and {count} vCPUs")
                }
            ))
        } else if r.target > r.old {
            let c = lock(&self.parts.cpu_hotplug);
            let waiting: Vec<u8> = (r.old..r.target).filter(|i| c.slot(*i).inserting).collect();
            Response::err(format!(
                "the guest has not taken vCPUs {waiting:?} within {waited} ms; they are present \
                 (the VM has {count}) and the guest may still bring them online"
            ))
        } else {
            lock(&self.parts.cpu_hotplug).cancel_removals();
            Response::err(format!(
                "the guest gave back {} of {} vCPUs within {waited} ms; the VM has {count}",
                r.old - count,
                r.old - r.target
            ))
        };
        if let Some(e) = &answer.error {
            tracing::warn!(error = %e, "resize incomplete");
        }
        r.reply.send(answer);
    }

    /// Stats need a round trip through the guest: answered from a thread of its own, so the main
    /// loop never waits on the guest.
    fn balloon_stats(&self, reply: Reply) {
        let Some((_, control)) = &self.balloon else {
            reply.send(Response::err(
                "this VM has no balloon (start it with --balloon)",
            ));
            return;
        };
        let control = control.clone();
        let spawned = std::thread::Builder::new()
            .name("balloon-stats".into())
            .spawn(move || {
                let stats = control.refresh_stats(Duration::from_secs(2));
                reply.send(Response::ok(&BalloonStats {
                    target_mib: pages_to_mib(control.target_pages()),
                    actual_mib: pages_to_mib(control.actual_pages()),
                    stats: api::GuestMemoryStats {
                        reports: stats.reports,
                        values: stats.values,
                    },
                }));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the balloon stats thread");
        }
    }

    fn finish(self, exit_code: i32, reason: String) -> Outcome {
        lock(&self.parts.serial).flush_output();
        if let Some(p) = &self.config.api_socket {
            let _ = std::fs::remove_file(p);
        }
        Outcome { exit_code, reason }
    }
}

/// Balloon pages in MiB.
fn pages_to_mib(pages: u32) -> u64 {
    (u64::from(pages) * BALLOON_PAGE) >> 20
}
