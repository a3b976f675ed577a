//! Builds a VM from a validated configuration and runs it to its end: the main loop receives guest
//! exits, vCPU failures and API requests on one channel and answers them.

use std::io::LineWriter;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig};
use crate::api::{
    self, BalloonStats, BalloonTarget, BootProtocol, Cancelling, Info, MigrationOutcome,
    MigrationPhase, MigrationStatus, Reply, Request, Response, RunState, SnapshotDone,
    StateChanged, StopKind, Stopped,
};
use crate::arch::layout::*;
use crate::arch::regs;
use crate::boot;
use crate::config::{SerialOutput, VmConfig};
use crate::devices::ged::{Ged, POWER_BUTTON_BIT};
use crate::devices::manager::VirtioDevices;
use crate::devices::power::{AcpiPm, DebugExit, ExitReason, I8042};
use crate::devices::serial::{self, SerialDevice};
use crate::devices::virtio::balloon::{Balloon, BalloonControl, BALLOON_PAGE};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{self, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::{lock, Bus};
use crate::memory::Backing;
use crate::migration::{MigrationError, Snapshottable};
use crate::snapshot::{self, SnapshotState};
use crate::vcpu::{Vcpu, VcpuSet};
use crate::vm::Vm;

/// Everything the main loop reacts to.
pub enum VmmEvent {
    GuestExit(ExitReason),
    VcpuFailed(String),
    Api(Request, Reply),
    /// The migration's outcome, for whoever asked for it.
    MigrationDone(MigrationOutcome),
    /// A handover the target claimed but had not finished when the outcome went out has ended.
    MigrationLate(crate::migrate::Late),
}

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A built, running VM.
pub struct Machine {
    config: VmConfig,
    vcpus: Arc<VcpuSet>,
    serial: Arc<Mutex<SerialDevice>>,
    ged: Arc<Mutex<Ged>>,
    events: Receiver<VmmEvent>,
    state: RunState,
    started: Instant,
    /// How the guest was started: a boot protocol, or `None` when restored from a snapshot.
    boot_mode: Option<regs::EntryMode>,
    balloon: Option<(Arc<Mutex<MmioTransport>>, Arc<BalloonControl>)>,
    virtio: VirtioDevices,
    vm: Arc<Vm>,
    migration: Option<Migration>,
    events_tx: Sender<VmmEvent>,
}

/// A live migration under way: who waits for the outcome (nobody once it has gone out while the
/// target still holds the claim), and what the API can see or stop.
struct Migration {
    reply: Option<Reply>,
    progress: Arc<Mutex<api::MigrationProgress>>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// Where a machine's state comes from.
enum Start {
    /// Boot the configured kernel.
    Boot,
    /// Continue a snapshot: its state and its memory file.
    Restore(Box<SnapshotState>, std::fs::File),
}

/// How the VM ended: the process exit status and a description.
pub struct Outcome {
    pub exit_code: i32,
    pub reason: String,
}

/// Every device's state, in a fixed order (docs/snapshot.md).
fn save_devices(
    serial: &Mutex<SerialDevice>,
    ged: &Mutex<Ged>,
    virtio: &VirtioDevices,
) -> Result<Vec<crate::migration::ComponentState>, MigrationError> {
    let mut devices = vec![lock(serial).snapshot()?, lock(ged).snapshot()?];
    devices.extend(virtio.save()?);
    Ok(devices)
}

fn serial_output(cfg: &SerialOutput) -> Result<serial::Output> {
    Ok(match cfg {
        SerialOutput::Stdio => Box::new(LineWriter::new(std::io::stdout())),
        SerialOutput::File(path) => Box::new(LineWriter::new(
            crate::devices::console_log::CappedLog::open(
                path,
                crate::devices::console_log::CONSOLE_CAP,
            )
            .with_context(|| format!("cannot open serial output file {}", path.display()))?,
        )),
    })
}

impl Machine {
    /// Creates the VM, its devices and vCPUs, loads the kernel and starts the vCPUs.
    pub fn build(config: VmConfig, kvm: kvm_ioctls::Kvm) -> Result<Machine> {
        Self::assemble(config, kvm, Start::Boot, false)
    }

    /// Starts a new VM from the snapshot in `dir`: memory is mapped from the snapshot's file, not
    /// copied. The console and API socket are this process's, not the snapshot's. Everything is
    /// checked before anything starts.
    pub fn restore(
        dir: &std::path::Path,
        serial: SerialOutput,
        api_socket: Option<std::path::PathBuf>,
        paused: bool,
        kvm: kvm_ioctls::Kvm,
    ) -> Result<Machine> {
        let state = snapshot::read_state(dir)?;
        state
            .config
            .check(kvm.get_max_vcpus() as u32)
            .with_context(|| format!("snapshot {}", dir.display()))?;
        snapshot::check_external(&state)?;
        let memory = snapshot::open_memory(dir, state.config.memory_bytes())?;
        if state.vcpus.len() != usize::from(state.config.vcpus) {
            return Err(snapshot::SnapshotError::Decode(
                dir.join(snapshot::STATE_FILE),
                format!(
                    "{} vCPU states for {} vCPUs",
                    state.vcpus.len(),
                    state.config.vcpus
                ),
            )
            .into());
        }
        let mut config = state.config.clone();
        config.serial = serial;
        config.api_socket = api_socket;
        Self::assemble(config, kvm, Start::Restore(Box::new(state), memory), paused)
    }

    fn assemble(
        mut config: VmConfig,
        kvm: kvm_ioctls::Kvm,
        start: Start,
        paused: bool,
    ) -> Result<Machine> {
        let listener = match &config.api_socket {
            Some(p) => Some(api::server::bind(p)?),
            None => None,
        };
        let (tx, rx) = channel();
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("cannot read the CPUID KVM supports")?;
        let mut vm = match &start {
            Start::Boot => Vm::new(kvm, config.memory_bytes())?,
            Start::Restore(_, file) => {
                let mem = crate::memory::map_snapshot_memory(file, config.memory_bytes())?;
                Vm::with_memory(kvm, mem, Backing::Snapshot(file.try_clone()?))?
            }
        };

        // Devices.
        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        vm.fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .context("cannot wire the serial interrupt")?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            serial_output(&config.serial)?,
        )));
        io_bus.insert(u64::from(COM1_PORT), 8, serial.clone())?;
        io_bus.insert(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            3,
            Arc::new(Mutex::new(AcpiPm::new(tx.clone()))),
        )?;
        io_bus.insert(
            u64::from(I8042_CMD_PORT),
            1,
            Arc::new(Mutex::new(I8042::new(tx.clone()))),
        )?;
        io_bus.insert(
            u64::from(DEBUG_EXIT_PORT),
            1,
            Arc::new(Mutex::new(DebugExit::new(tx.clone()))),
        )?;
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        vm.fd
            .register_irqfd(&ged_irq, GED_IRQ)
            .context("cannot wire the GED interrupt")?;
        let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
        mmio_bus.insert(GED_START, GED_SIZE, ged.clone())?;

        // virtio devices, in the order the guest sees them.
        let mut virtio = VirtioDevices::default();
        for d in &config.devices.disks {
            let disk = Block::open(&d.path, d.read_only)?;
            virtio.attach(&vm.fd, &vm.memory, &mut mmio_bus, Box::new(disk))?;
        }
        for n in &mut config.devices.nets {
            let mac = n
                .mac
                .as_deref()
                .and_then(net::parse_mac)
                .unwrap_or_else(net::random_mac);
            // The MAC the guest saw travels with snapshots and migrations.
            n.mac = Some(net::format_mac(&mac));
            let dev = Net::new(Tap::open(&n.tap)?, mac);
            virtio.attach(&vm.fd, &vm.memory, &mut mmio_bus, Box::new(dev))?;
        }
        if config.devices.rng {
            virtio.attach(&vm.fd, &vm.memory, &mut mmio_bus, Box::new(Rng::default()))?;
        }
        if let Some(v) = &config.devices.vsock {
            let dev = Vsock::new(v.cid, &v.socket)?;
            virtio.attach(&vm.fd, &vm.memory, &mut mmio_bus, Box::new(dev))?;
        }
        let balloon = match config.devices.balloon {
            Some(b) => {
                let (dev, control) = Balloon::new(b.deflate_on_oom);
                let transport = virtio.attach(&vm.fd, &vm.memory, &mut mmio_bus, Box::new(dev))?;
                Some((transport, control))
            }
            None => None,
        };

        let (vcpus, boot_mode) = match start {
            Start::Boot => {
                // Tables, kernel, boot structures.
                let tables = acpi::build(&AcpiConfig {
                    vcpus: config.vcpus,
                    max_vcpus: config.vcpus,
                    virtio: virtio.info.clone(),
                });
                tables
                    .write(&vm.memory)
                    .context("cannot write the ACPI tables")?;
                let entry = boot::load(
                    &vm.memory,
                    &config.kernel,
                    config.initrd.as_deref(),
                    &config.cmdline,
                    tables.rsdp_addr,
                )?;
                regs::write_boot_tables(&vm.memory, entry.mode)
                    .context("cannot write boot page tables")?;
                let vcpus = (0..config.vcpus)
                    .map(|i| Vcpu::new(&vm.fd, &supported_cpuid, i, config.vcpus, &entry))
                    .collect::<Result<Vec<_>, _>>()?;
                (vcpus, Some(entry.mode))
            }
            Start::Restore(state, _) => {
                // VM-wide state (interrupt controllers, PIT, clock) before the vCPUs' LAPICs.
                vm.restore_snapshot(&state.vm)?;
                let placeholder = boot::BootEntry {
                    entry: 0,
                    boot_info: 0,
                    mode: regs::EntryMode::Pvh,
                };
                let mut vcpus = Vec::new();
                for (i, s) in state.vcpus.iter().enumerate() {
                    let mut v = Vcpu::new(
                        &vm.fd,
                        &supported_cpuid,
                        i as u8,
                        config.vcpus,
                        &placeholder,
                    )?;
                    v.restore_snapshot(s)?;
                    vcpus.push(v);
                }
                let mut restored_virtio = 0;
                for d in &state.devices {
                    match d.id.as_str() {
                        "serial0" => lock(&serial).restore_snapshot(d)?,
                        "ged" => lock(&ged).restore_snapshot(d)?,
                        _ if virtio.restore(d)? => restored_virtio += 1,
                        other => {
                            anyhow::bail!("the snapshot has state for an unknown device '{other}'")
                        }
                    }
                }
                if restored_virtio != virtio.transports.len() {
                    anyhow::bail!(
                        "the snapshot has state for {restored_virtio} of the VM's {} virtio devices",
                        virtio.transports.len()
                    );
                }
                if !paused {
                    virtio.resume()?;
                }
                (vcpus, None)
            }
        };
        let vcpus = Arc::new(VcpuSet::start(vcpus, io_bus, mmio_bus, tx.clone(), paused)?);

        if config.serial == SerialOutput::Stdio {
            serial::spawn_stdin_reader(serial.clone())
                .context("cannot start the serial input thread")?;
        }
        if let Some(l) = listener {
            api::server::spawn(l, tx.clone()).context("cannot start the API thread")?;
        }
        tracing::info!(vcpus = config.vcpus, memory_mib = config.memory_mib, mode = ?boot_mode, "VM started");
        Ok(Machine {
            config,
            vcpus,
            serial,
            ged,
            events: rx,
            state: if paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            started: Instant::now(),
            boot_mode,
            balloon,
            virtio,
            vm: Arc::new(vm),
            migration: None,
            events_tx: tx,
        })
    }

    /// Devices before vCPUs, so the guest finds them working.
    fn resume_all(&self) {
        if let Err(e) = self.virtio.resume() {
            tracing::error!(error = %e, "a device did not resume");
        }
        self.vcpus.resume();
    }

    fn info(&self) -> Info {
        Info {
            state: self.state,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vcpus: self.vcpus.count() as u32,
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
                VmmEvent::GuestExit(reason) => {
                    if let Some((_, reply)) = shutdown.take() {
                        reply.send_and_flush(Response::ok(&Stopped {
                            stopped: StopKind::Graceful,
                        }));
                    }
                    return self.finish(reason.exit_code(), format!("guest exit: {reason:?}"));
                }
                VmmEvent::VcpuFailed(msg) => {
                    if let Some((_, reply)) = shutdown.take() {
                        reply.send_and_flush(Response::err(msg.clone()));
                    }
                    return self.finish(1, msg);
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
                    if let Err(e) = lock(&self.ged).notify(POWER_BUTTON_BIT) {
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
                        // Still a migration: nothing may resume or change the guest meanwhile.
                        self.state = RunState::Paused;
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
                            self.state = RunState::Running;
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

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Info {} => Response::ok(&self.info()),
            Request::Pause {} => {
                if self.state == RunState::Paused {
                    return Response::err("the VM is already paused");
                }
                // vCPUs first (no new requests), then the devices finish what they hold.
                let paused = self
                    .vcpus
                    .pause(PAUSE_TIMEOUT)
                    .map_err(|e| e.to_string())
                    .and_then(|()| self.virtio.pause().map_err(|e| e.to_string()));
                match paused {
                    Ok(()) => {
                        self.state = RunState::Paused;
                        Response::ok(&StateChanged {
                            state: RunState::Paused,
                        })
                    }
                    Err(e) => {
                        self.resume_all();
                        Response::err(e)
                    }
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

    fn save_devices(&self) -> Result<Vec<crate::migration::ComponentState>, MigrationError> {
        save_devices(&self.serial, &self.ged, &self.virtio)
    }

    /// Writes the paused VM's complete state and memory to `dir` (docs/snapshot.md). The state
    /// file is written last, so a directory without one holds no usable snapshot.
    fn snapshot(&mut self, dir: &std::path::Path) -> Result<SnapshotDone> {
        if self.state != RunState::Paused {
            anyhow::bail!("pause the VM before taking a snapshot");
        }
        let t0 = Instant::now();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let state = SnapshotState {
            config: self.config.clone(),
            vm: crate::migration::tag("vm", Vm::STATE_VERSION, self.vm.save_state()?)?,
            vcpus: self.vcpus.save()?,
            devices: self.save_devices()?,
        };
        snapshot::write_memory(dir, &self.vm.memory, &self.vm.backing)?;
        snapshot::write_state(dir, &state)?;
        Ok(SnapshotDone {
            dir: dir.into(),
            memory_bytes: self.config.memory_bytes(),
            ms: t0.elapsed().as_secs_f64() * 1000.0,
        })
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
        let (serial, ged, virtio) = (self.serial.clone(), self.ged.clone(), self.virtio.clone());
        let source = crate::migrate::Source {
            vm: self.vm.clone(),
            vcpus: self.vcpus.clone(),
            config: self.config.clone(),
            save_devices: Box::new(move || save_devices(&serial, &ged, &virtio)),
            virtio: self.virtio.clone(),
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
        lock(&self.serial).flush_output();
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
