//! A machine's state as one tree: [`Components`] holds every stateful part of a running VM and
//! pauses, saves and restores them in one fixed order, for snapshots and live migration alike.
//! Also writing a snapshot of a machine and starting one from a snapshot.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::api::{RunState, SnapshotDone};
use crate::builder::{Events, RestoredMemory, Start};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::cpu_hotplug::CpuHotplug;
use crate::devices::ged::Ged;
use crate::devices::lock;
use crate::devices::manager::VirtioDevices;
use crate::devices::serial::SerialDevice;
use crate::migration::{MigrationError, Pausable, Snapshottable};
use crate::snapshot::{self, DeviceStates, SnapshotState};
use crate::vcpu::VcpuSet;
use crate::vm::Vm;
use crate::vmm::Machine;

/// Every stateful part of a running VM. Shared (cheaply cloned) by the control loop and the
/// migration thread; the VM's memory is reached through `vm`.
#[derive(Clone)]
pub struct Components {
    pub vm: Arc<Vm>,
    pub vcpus: Arc<VcpuSet>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ged: Arc<Mutex<Ged>>,
    pub cpu_hotplug: Arc<Mutex<CpuHotplug>>,
    pub virtio: VirtioDevices,
}

impl Pausable for Components {
    /// vCPUs first (no new requests), then the devices finish what they hold. If a device cannot
    /// pause, everything runs again and the error is returned.
    fn pause(&self) -> Result<(), MigrationError> {
        self.vcpus.pause()?;
        let devices = self
            .vm
            .pause()
            .and_then(|()| lock(&self.serial).pause())
            .and_then(|()| lock(&self.ged).pause())
            .and_then(|()| lock(&self.cpu_hotplug).pause())
            .and_then(|()| self.virtio.pause());
        if let Err(e) = devices {
            if let Err(r) = self.resume() {
                tracing::error!(error = %r, "cannot resume after a failed pause");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Devices before vCPUs, so the guest finds them working. Everything is resumed even when one
    /// part fails; the first failure is returned.
    fn resume(&self) -> Result<(), MigrationError> {
        let results = [
            self.virtio.resume(),
            lock(&self.ged).resume(),
            lock(&self.cpu_hotplug).resume(),
            lock(&self.serial).resume(),
            self.vm.resume(),
            self.vcpus.resume(),
        ];
        results.into_iter().collect()
    }
}

impl Components {
    /// The whole tree, with the configuration that rebuilds the same machine. Call while paused.
    pub fn save(&self, config: &VmConfig) -> Result<SnapshotState, MigrationError> {
        Ok(SnapshotState {
            config: config.clone(),
            vm: self.vm.snapshot()?,
            vcpus: self.vcpus.save()?,
            devices: self.save_devices()?,
        })
    }

    pub fn save_devices(&self) -> Result<DeviceStates, MigrationError> {
        let serial = {
            let mut s = lock(&self.serial);
            // What the guest printed up to the pause reaches its console file now, a line the
            // pause cut included: a migration target appends to the same file, and a line
            // left in this process's buffer until it exits would land after the target's.
            s.flush_output();
            s.snapshot()?
        };
        Ok(DeviceStates {
            serial,
            ged: lock(&self.ged).snapshot()?,
            cpu_hotplug: Some(lock(&self.cpu_hotplug).snapshot()?),
            virtio: self.virtio.save()?,
        })
    }

    /// Loads saved device states into freshly built devices (the VM and vCPUs are restored as
    /// they are built). The devices start on the next [`Pausable::resume`].
    pub fn restore_devices(&self, d: DeviceStates) -> Result<(), MigrationError> {
        lock(&self.serial).restore_snapshot(d.serial)?;
        lock(&self.ged).restore_snapshot(d.ged)?;
        // A 2.0 snapshot has none: its slots are the configured vCPUs, as built.
        if let Some(c) = d.cpu_hotplug {
            lock(&self.cpu_hotplug).restore_snapshot(c)?;
        }
        self.virtio.restore(d.virtio)
    }
}

impl Machine {
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
        let memory = snapshot::open_memory(dir, state.config.memory_bytes())?;
        let start = (serial, api_socket, paused, None);
        Self::restore_state(dir, state, RestoredMemory::File(memory), start, kvm)
    }

    /// Starts a VM from a snapshot's state (read from `dir`) and its memory, once both are
    /// checked; `start` is the console, API socket, whether to stay paused, and the control
    /// channel if the API is already served.
    pub(crate) fn restore_state(
        dir: &std::path::Path,
        state: SnapshotState,
        memory: RestoredMemory,
        start: (
            SerialOutput,
            Option<std::path::PathBuf>,
            bool,
            Option<Events>,
        ),
        kvm: kvm_ioctls::Kvm,
    ) -> Result<Machine> {
        let (serial, api_socket, paused, served) = start;
        state
            .config
            .check(kvm.get_max_vcpus() as u32)
            .with_context(|| format!("snapshot {}", dir.display()))?;
        snapshot::check_external(&state)?;
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
        Self::assemble(
            config,
            kvm,
            Start::Restore(Box::new(state), memory),
            paused,
            served,
        )
    }

    /// The guest came in by live migration: its NICs tell the network where it is now.
    pub fn announce(&self) {
        self.parts.virtio.announce();
    }

    /// Writes the paused VM's complete state and memory to `dir` (docs/snapshot.md). The state
    /// file is written last, so a directory without one holds no usable snapshot.
    pub(crate) fn snapshot(&mut self, dir: &std::path::Path) -> Result<SnapshotDone> {
        if self.state != RunState::Paused {
            anyhow::bail!("pause the VM before taking a snapshot");
        }
        let t0 = Instant::now();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let state = self.parts.save(&self.config)?;
        snapshot::write_memory(dir, &self.parts.vm.ram(), &self.parts.vm.backing)?;
        snapshot::write_state(dir, &state)?;
        Ok(SnapshotDone {
            dir: dir.into(),
            memory_bytes: self.config.memory_bytes(),
            ms: t0.elapsed().as_secs_f64() * 1000.0,
        })
    }
}
