//! Builds a VM from a validated configuration and runs it to its end: the main loop receives guest
//! exits, vCPU failures and API requests on one channel and answers them.

use std::io::LineWriter;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig};
use crate::api::{self, Request, Response};
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
use crate::vcpu::{Vcpu, VcpuSet};
use crate::vm::Vm;

/// Everything the main loop reacts to.
pub enum VmmEvent {
    GuestExit(ExitReason),
    VcpuFailed(String),
    Api(Request, Sender<Response>),
}

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

/// A built, running VM.
pub struct Machine {
    config: VmConfig,
    vcpus: VcpuSet,
    serial: Arc<Mutex<SerialDevice>>,
    ged: Arc<Mutex<Ged>>,
    events: Receiver<VmmEvent>,
    state: RunState,
    started: Instant,
    boot_mode: regs::EntryMode,
    balloon: Option<(Arc<Mutex<MmioTransport>>, Arc<BalloonControl>)>,
    _virtio: VirtioDevices,
    _vm: Vm,
}

/// How the VM ended: the process exit status and a description.
pub struct Outcome {
    pub exit_code: i32,
    pub reason: String,
}

fn serial_output(cfg: &SerialOutput) -> Result<serial::Output> {
    Ok(match cfg {
        SerialOutput::Stdio => Box::new(LineWriter::new(std::io::stdout())),
        SerialOutput::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open serial output file {}", path.display()))?;
            Box::new(LineWriter::new(f))
        }
    })
}

impl Machine {
    /// Creates the VM, its devices and vCPUs, loads the kernel and starts the vCPUs.
    pub fn build(config: VmConfig, kvm: kvm_ioctls::Kvm) -> Result<Machine> {
        let listener = match &config.api_socket {
            Some(p) => Some(api::server::bind(p)?),
            None => None,
        };
        let (tx, rx) = channel();
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("cannot read the CPUID KVM supports")?;
        let vm = Vm::new(kvm, config.memory_bytes())?;

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
        for n in &config.devices.nets {
            let mac = n
                .mac
                .as_deref()
                .and_then(net::parse_mac)
                .unwrap_or_else(net::random_mac);
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
        regs::write_boot_tables(&vm.memory, entry.mode).context("cannot write boot page tables")?;

        let vcpus = (0..config.vcpus)
            .map(|i| Vcpu::new(&vm.fd, &supported_cpuid, i, config.vcpus, &entry))
            .collect::<Result<Vec<_>, _>>()?;
        let vcpus = VcpuSet::start(vcpus, io_bus, mmio_bus, tx.clone())?;

        if config.serial == SerialOutput::Stdio {
            serial::spawn_stdin_reader(serial.clone())
                .context("cannot start the serial input thread")?;
        }
        if let Some(l) = listener {
            api::server::spawn(l, tx).context("cannot start the API thread")?;
        }
        tracing::info!(vcpus = config.vcpus, memory_mib = config.memory_mib, mode = ?entry.mode, "VM started");
        Ok(Machine {
            config,
            vcpus,
            serial,
            ged,
            events: rx,
            state: RunState::Running,
            started: Instant::now(),
            boot_mode: entry.mode,
            balloon,
            _virtio: virtio,
            _vm: vm,
        })
    }

    fn info(&self) -> serde_json::Value {
        json!({
            "state": self.state.as_str(),
            "pid": std::process::id(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "vcpus": self.vcpus.count(),
            "memory_mib": self.config.memory_mib,
            "boot_protocol": match self.boot_mode {
                regs::EntryMode::Pvh => "pvh",
                regs::EntryMode::Linux64 => "linux64",
            },
            "config": self.config,
        })
    }

    /// Runs until the guest stops or is stopped.
    pub fn run(mut self) -> Outcome {
        // A pending shutdown: when to force it, and who waits for the answer.
        let mut shutdown: Option<(Instant, Sender<Response>)> = None;
        loop {
            let event = match &shutdown {
                Some((deadline, _)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.events.recv_timeout(left) {
                        Ok(e) => e,
                        Err(RecvTimeoutError::Timeout) => {
                            if let Some((_, reply)) = shutdown.take() {
                                let _ = reply.send(Response::ok(json!({"stopped": "forced"})));
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
                        let _ = reply.send(Response::ok(json!({"stopped": "graceful"})));
                    }
                    return self.finish(reason.exit_code(), format!("guest exit: {reason:?}"));
                }
                VmmEvent::VcpuFailed(msg) => {
                    if let Some((_, reply)) = shutdown.take() {
                        let _ = reply.send(Response::err(msg.clone()));
                    }
                    return self.finish(1, msg);
                }
                VmmEvent::Api(Request::Shutdown { timeout_ms }, reply) => {
                    if shutdown.is_some() {
                        let _ = reply.send(Response::err("a shutdown is already in progress"));
                        continue;
                    }
                    if self.state == RunState::Paused {
                        // A paused guest cannot react to the button.
                        self.vcpus.resume();
                        self.state = RunState::Running;
                    }
                    if let Err(e) = lock(&self.ged).notify(POWER_BUTTON_BIT) {
                        tracing::warn!(error = %e, "cannot signal the power button");
                    }
                    shutdown = Some((Instant::now() + Duration::from_millis(timeout_ms), reply));
                }
                VmmEvent::Api(Request::BalloonStats, reply) => self.balloon_stats(reply),
                VmmEvent::Api(req, reply) => {
                    let _ = reply.send(self.handle(req));
                }
            }
        }
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Info => Response::ok(self.info()),
            Request::Pause => {
                if self.state == RunState::Paused {
                    return Response::err("the VM is already paused");
                }
                match self.vcpus.pause(PAUSE_TIMEOUT) {
                    Ok(()) => {
                        self.state = RunState::Paused;
                        Response::ok(json!({"state": "paused"}))
                    }
                    Err(e) => {
                        self.vcpus.resume();
                        Response::err(e.to_string())
                    }
                }
            }
            Request::Resume => {
                if self.state == RunState::Running {
                    return Response::err("the VM is not paused");
                }
                self.vcpus.resume();
                self.state = RunState::Running;
                Response::ok(json!({"state": "running"}))
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
                Response::ok(json!({"target_mib": mib}))
            }
            Request::Shutdown { .. } | Request::BalloonStats => {
                Response::err("handled by the main loop")
            }
        }
    }

    /// Stats need a round trip through the guest: answered from a thread of its own, so the main
    /// loop never waits on the guest.
    fn balloon_stats(&self, reply: Sender<Response>) {
        let Some((_, control)) = &self.balloon else {
            let _ = reply.send(Response::err(
                "this VM has no balloon (start it with --balloon)",
            ));
            return;
        };
        let control = control.clone();
        let spawned = std::thread::Builder::new()
            .name("balloon-stats".into())
            .spawn(move || {
                let stats = control.refresh_stats(Duration::from_secs(2));
                let to_mib = |pages: u32| (u64::from(pages) * BALLOON_PAGE) >> 20;
                let _ = reply.send(Response::ok(json!({
                    "target_mib": to_mib(control.target_pages()),
                    "actual_mib": to_mib(control.actual_pages()),
                    "stats": stats,
                })));
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
