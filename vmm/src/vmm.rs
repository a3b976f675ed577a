//! The control loop: runs a built machine (`builder`, `persist`) to its end. Guest exits, API
//! requests and the migration thread's pause and resume requests arrive on one channel, and this
//! loop alone changes the run state.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{
    self, BalloonStats, BalloonTarget, BootProtocol, Cancelling, Info, MigrationOutcome,
    MigrationPhase, MigrationStatus, Reply, Request, Response, RunState, StateChanged, StopKind,
    Stopped,
};
use crate::arch::regs;
use crate::config::VmConfig;
use crate::devices::ged::POWER_BUTTON_BIT;
use crate::devices::lock;
use crate::devices::power::ExitReason;
use crate::devices::virtio::balloon::{BalloonControl, BALLOON_PAGE};
use crate::devices::virtio::mmio::MmioTransport;
use crate::migration::Pausable;
use crate::persist::Components;

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
}

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
    pub(crate) migration: Option<Migration>,
    pub(crate) events_tx: Sender<VmmEvent>,
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
            memory_mib: self.config.memory_mib,
            boot_protocol: match self.boot_mode {
                Some(regs::EntryMode::Pvh) => BootProtocol::Pvh,
                Some(regs::EntryMode::Linux64) => BootProtocol::Linux64,
                None => BootProtocol::Restored,
            },
            config: serde_json::to_value(&self.config).unwrap_or_default(),
            balloon: self.balloon.as_ref().map(|(_, c)| BalloonTarget {
                target_mib: pages_to_mib(c.target_pages()),
                actual_mib: Some(pages_to_mib(c.actual_pages())),
            }),
            migration: self.migration.as_ref().map(|m| lock(&m.progress).clone()),
        }
    }

    /// Runs until the guest stops or is stopped.
    pub fn run(mut self) -> Outcome {
        // A pending shutdown: when to force it, and who waits for the answer.
        let mut shutdown: Option<(Instant, Reply)> = None;
        loop {
            let event = match &shutdown {
                Some((deadline, _)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.events.recv_timeout(left) {
                        Ok(e) => e,
                        Err(RecvTimeoutError::Timeout) => {
                            if let Some((_, reply)) = shutdown.take() {
                                reply.send_and_flush(Response::ok(&Stopped {
                                    stopped: StopKind::Forced,
                                }));
                            }
                            return self.finish(0, "forced stop after the shutdown timeout".into());
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            return self.finish(1, "event channel closed".into())
                        }
                    }
                }
                None => match self.events.recv() {
                    Ok(e) => e,
                    Err(_) => return self.finish(1, "event channel closed".into()),
                },
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
                VmmEvent::Api(Request::Info {}, reply) => reply.send(Response::ok(&self.info())),
                VmmEvent::Api(_, reply) if self.migration.is_some() => {
                    reply.send(Response::err("a migration is in progress"));
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
                if mib > self.config.memory_mib {
                    return Response::err(format!(
                        "balloon target {mib} MiB is larger than the VM's memory ({} MiB)",
                        self.config.memory_mib
                    ));
                }
                control.set_target_pages((mib << 20).div_ceil(BALLOON_PAGE) as u32);
                lock(transport).config_changed();
                Response::ok(&BalloonTarget {
                    target_mib: mib,
                    actual_mib: None,
                })
            }
            Request::Migrate { .. } | Request::MigrateCancel {} => {
                Response::err("handled by the main loop")
            }
            Request::Snapshot { dir } => match self.snapshot(&dir) {
                Ok(v) => Response::ok(&v),
                Err(e) => Response::err(format!("{e:#}")),
            },
            Request::Shutdown { .. } | Request::BalloonStats {} => {
                Response::err("handled by the main loop")
            }
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
        let progress = Arc::new(Mutex::new(api::MigrationProgress::default()));
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tx = self.events_tx.clone();
        let run: crate::migrate::RunControl = Box::new(move |want| {
            let (answer, rx) = std::sync::mpsc::channel();
            let gone = || "the VMM is exiting".to_string();
            tx.send(VmmEvent::Run(want, answer)).map_err(|_| gone())?;
            rx.recv().map_err(|_| gone())?
        });
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
