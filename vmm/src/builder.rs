//! Building a machine: the VM and its memory, the devices on their buses, the vCPUs, and either
//! a booted kernel or a snapshot's state loaded into all of them (`persist` reads the snapshot).

use std::io::LineWriter;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig};
use crate::api::{self, RunState};
use crate::arch::layout::*;
use crate::arch::regs;
use crate::boot;
use crate::config::{SerialOutput, VmConfig};
use crate::devices::cpu_hotplug::CpuHotplug;
use crate::devices::ged::Ged;
use crate::devices::manager::VirtioDevices;
use crate::devices::power::{AcpiPm, DebugExit, ExitSignal, I8042};
use crate::devices::serial::{self, SerialDevice};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mem::Mem;
use crate::devices::virtio::net::{self, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::Bus;
use crate::memory::Backing;
use crate::migration::{Pausable, Snapshottable};
use crate::persist::Components;
use crate::snapshot::SnapshotState;
use crate::vcpu::{Vcpu, VcpuSet};
use crate::vm::Vm;
use crate::vmm::{Machine, VmmEvent};

/// Where a machine's state comes from.
pub(crate) enum Start {
    /// Boot the configured kernel.
    Boot,
    /// Continue a snapshot: its state and its memory.
    Restore(Box<SnapshotState>, RestoredMemory),
}

/// A restored machine's memory.
pub(crate) enum RestoredMemory {
    /// The snapshot's memory file, mapped privately (pages load on first touch).
    File(std::fs::File),
    /// Memory already loaded in this process (a promoted standby, `standby`): a shared memfd,
    /// as a booted VM has.
    Loaded(crate::memory::GuestMemory, std::fs::File),
}

/// The control loop's channel, when the API is already served on it (a standby's, which keeps
/// its socket across the promotion).
pub(crate) type Events = (
    std::sync::mpsc::Sender<VmmEvent>,
    std::sync::mpsc::Receiver<VmmEvent>,
);

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
        Self::assemble(config, kvm, Start::Boot, false, None)
    }

    pub(crate) fn assemble(
        mut config: VmConfig,
        kvm: kvm_ioctls::Kvm,
        start: Start,
        paused: bool,
        served: Option<Events>,
    ) -> Result<Machine> {
        let listener = match (&config.api_socket, &served) {
            (Some(p), None) => Some(api::server::bind(p)?),
            _ => None,
        };
        let (tx, rx) = served.unwrap_or_else(channel);
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("cannot read the CPUID KVM supports")?;
        let mut vm = match &start {
            Start::Boot => Vm::new(kvm, config.memory_layout())?,
            Start::Restore(_, RestoredMemory::File(file)) => {
                let mem = crate::memory::map_snapshot_memory(file, config.memory_layout())?;
                Vm::with_memory(kvm, mem, Backing::Snapshot(file.try_clone()?))?
            }
            Start::Restore(_, RestoredMemory::Loaded(mem, memfd)) => {
                Vm::with_memory(kvm, mem.clone(), Backing::Memfd(memfd.try_clone()?))?
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
        let exit = {
            let tx = tx.clone();
            ExitSignal::new(move |why| {
                let _ = tx.send(VmmEvent::GuestExit(why));
            })
        };
        io_bus.insert(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            3,
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        )?;
        io_bus.insert(
            u64::from(I8042_CMD_PORT),
            1,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        io_bus.insert(
            u64::from(DEBUG_EXIT_PORT),
            1,
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        )?;
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        vm.fd
            .register_irqfd(&ged_irq, GED_IRQ)
            .context("cannot wire the GED interrupt")?;
        let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
        mmio_bus.insert(GED_START, GED_SIZE, ged.clone())?;
        let cpu_hotplug = {
            let tx = tx.clone();
            Arc::new(Mutex::new(CpuHotplug::new(
                config.max_vcpus,
                config.vcpus,
                Box::new(move |i| {
                    let _ = tx.send(VmmEvent::VcpuEjected(i));
                }),
            )))
        };
        mmio_bus.insert(CPU_HOTPLUG_START, CPU_HOTPLUG_SIZE, cpu_hotplug.clone())?;

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
                .and_then(|m| m.parse::<vmm_api::Mac>().ok())
                .unwrap_or_else(net::random_mac);
            // The MAC the guest saw travels with snapshots and migrations.
            n.mac = Some(mac.to_string());
            let dev = Net::new(Tap::open(&n.tap)?, mac.0);
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
                let every = (b.stats_interval_ms > 0)
                    .then(|| std::time::Duration::from_millis(b.stats_interval_ms));
                let (dev, control) = Balloon::new(b.deflate_on_oom, every);
                let transport = virtio.attach(&vm.fd, &vm.memory, &mut mmio_bus, Box::new(dev))?;
                Some((transport, control))
            }
            None => None,
        };

        // virtio-mem last: devices keep their places in snapshots taken before it existed.
        let mem = if config.max_memory_mib.is_some() {
            let layout = config.memory_layout();
            let (dev, control) = Mem::new(layout.hotplug_start(), layout.hotplug);
            let transport = virtio.attach(&vm.fd, &vm.memory, &mut mmio_bus, Box::new(dev))?;
            Some((transport, control))
        } else {
            None
        };

        let mut restored_devices = None;
        let (vcpus, boot_mode) = match start {
            Start::Boot => {
                // Tables, kernel, boot structures.
                let tables = acpi::build(&AcpiConfig {
                    vcpus: config.vcpus,
                    max_vcpus: config.max_vcpus,
                    virtio: virtio.info.clone(),
                });
                tables
                    .write(&vm.ram())
                    .context("cannot write the ACPI tables")?;
                let entry = boot::load(
                    &vm.ram(),
                    &config.kernel,
                    config.initrd.as_deref(),
                    &config.cmdline,
                    tables.rsdp_addr,
                    config.memory_layout().boot,
                )?;
                regs::write_boot_tables(&vm.ram(), entry.mode)
                    .context("cannot write boot page tables")?;
                let vcpus = (0..config.vcpus)
                    .map(|i| Vcpu::new(&vm.fd, &supported_cpuid, i, config.max_vcpus, Some(&entry)))
                    .collect::<Result<Vec<_>, _>>()?;
                (vcpus, Some(entry.mode))
            }
            Start::Restore(state, _) => {
                let state = *state;
                // VM-wide state (interrupt controllers, PIT, clock) before the vCPUs' LAPICs.
                vm.restore_snapshot(state.vm)?;
                let mut vcpus = Vec::new();
                for (i, s) in state.vcpus.into_iter().enumerate() {
                    let mut v =
                        Vcpu::new(&vm.fd, &supported_cpuid, i as u8, config.max_vcpus, None)?;
                    v.restore_snapshot(s)?;
                    vcpus.push(v);
                }
                restored_devices = Some(state.devices);
                (vcpus, None)
            }
        };
        // From here on the guest runs: the main thread gives up what only building needed.
        crate::seccomp::apply(crate::seccomp::Kind::Vmm)?;
        // Restored devices start (their workers) with the vCPUs, not before: a vCPU that fails
        // to start leaves nothing running.
        let vcpus = Arc::new(VcpuSet::start(vcpus, io_bus, mmio_bus, exit, true)?);
        let parts = Components {
            vm: Arc::new(vm),
            vcpus,
            serial,
            ged,
            cpu_hotplug,
            virtio,
        };
        if let Some(devices) = restored_devices {
            parts.restore_devices(devices)?;
        }
        if !paused {
            parts.resume()?;
        }

        if config.serial == SerialOutput::Stdio {
            serial::spawn_stdin_reader(parts.serial.clone())
                .context("cannot start the serial input thread")?;
        }
        if let Some(l) = listener {
            let tx = tx.clone();
            let submit: api::server::Submit =
                Arc::new(move |req, reply| tx.send(VmmEvent::Api(req, reply)).is_ok());
            api::server::spawn(l, submit).context("cannot start the API thread")?;
        }
        tracing::info!(vcpus = config.vcpus, memory_mib = config.memory_mib, mode = ?boot_mode, "VM started");
        Ok(Machine {
            config,
            parts,
            events: rx,
            state: if paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            started: Instant::now(),
            boot_mode,
            balloon,
            mem,
            migration: None,
            checkpoint: None,
            checkpoints: Default::default(),
            resize: None,
            supported_cpuid,
            events_tx: tx,
            state_roots: Default::default(),
        })
    }
}
