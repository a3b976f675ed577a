//! Places devices in the guest: a virtio-mmio window, a GSI wired through an irqfd and one
//! ioeventfd per queue for each virtio device, and the ACPI description of each.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::virtio::mmio::TransportState;
use super::virtio::mmio::{reg, MmioTransport};
use super::virtio::{Interrupt, VirtioDevice};
use super::{lock, Bus, BusError};
use crate::acpi::MmioDeviceInfo;
use crate::arch::layout::{IOAPIC_PINS, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::SharedMemory;
use crate::migration::{MigrationError, Pausable, Snapshottable, Versioned};

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("too many virtio devices (at most {0})")]
    TooMany(u32),
    #[error("cannot wire {what} for {device}: {err}")]
    Kvm {
        device: &'static str,
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The virtio devices of one VM.
#[derive(Default, Clone)]
pub struct VirtioDevices {
    pub info: Vec<MmioDeviceInfo>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VirtioDevices {
    /// Attaches `device` at the next window and GSI.
    pub fn attach(
        &mut self,
        vm: &VmFd,
        mem: &SharedMemory,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Arc<Mutex<MmioTransport>>, DeviceError> {
        let index = self.info.len() as u32;
        let max = IOAPIC_PINS - VIRTIO_IRQ_START;
        if index >= max {
            return Err(DeviceError::TooMany(max));
        }
        let name = device.name();
        let base = VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_START + index;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(|err| DeviceError::Kvm {
                device: name,
                what: "the interrupt",
                err,
            })?;
        let mut queue_evts = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(|err| DeviceError::Kvm {
                device: name,
                what: "a queue notification",
                err,
            })?;
            queue_evts.push(evt);
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            format!("virtio{index}"),
            device,
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
            queue_evts,
        )));
        mmio_bus.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
        self.info.push(MmioDeviceInfo {
            base,
            size: VIRTIO_MMIO_SIZE,
            irq,
        });
        self.transports.push(transport.clone());
        Ok(transport)
    }
}

/// Every virtio device's worker stops (after the vCPUs, so nothing new arrives) and starts.
impl Pausable for VirtioDevices {
    fn pause(&self) -> Result<(), MigrationError> {
        self.transports.iter().try_for_each(|t| lock(t).pause())
    }

    fn resume(&self) -> Result<(), MigrationError> {
        self.transports.iter().try_for_each(|t| lock(t).resume())
    }
}

impl VirtioDevices {
    /// Every device's state, in attach order. Call while paused.
    pub fn save(&self) -> Result<Vec<Versioned<TransportState>>, MigrationError> {
        self.transports.iter().map(|t| lock(t).snapshot()).collect()
    }

    /// Restores each device from the state saved at its place: the same devices in the same
    /// order, as the configuration the snapshot carries builds them.
    pub fn restore(&self, saved: Vec<Versioned<TransportState>>) -> Result<(), MigrationError> {
        if saved.len() != self.transports.len() {
            return Err(MigrationError::Restore {
                id: "virtio".into(),
                reason: format!(
                    "state for {} virtio devices; the VM has {}",
                    saved.len(),
                    self.transports.len()
                ),
            });
        }
        for (t, s) in self.transports.iter().zip(saved) {
            lock(t).restore_snapshot(s)?;
        }
        Ok(())
    }

    /// After an incoming migration: the devices announce where the guest is now, five times
    /// over half a second (QEMU's schedule: a bridge or switch may miss the first).
    pub fn announce(&self) {
        let transports = self.transports.clone();
        let spawned = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                for delay_ms in [0, 50, 100, 150, 200] {
                    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                    for t in &transports {
                        if let Err(e) = lock(t).announce() {
                            tracing::warn!(error = %e, "cannot announce the migrated guest");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the announcing thread");
        }
    }

    /// The writable disks, in attach order (what a checkpoint copies).
    pub fn disks(&self) -> Vec<crate::devices::virtio::block::DiskView> {
        self.transports
            .iter()
            .filter_map(|t| lock(t).disk())
            .collect()
    }

    /// Migration handover: every device lets go of its host resources.
    pub fn release(&self) {
        self.transports.iter().for_each(|t| lock(t).release());
    }

    /// The migration failed: every device takes its resources back and continues from `saved`.
    /// Returns what could not be taken back (those devices need a reset from the driver).
    pub fn reacquire(&self, saved: &[Versioned<TransportState>]) -> Vec<String> {
        let mut errors = Vec::new();
        for (i, t) in self.transports.iter().enumerate() {
            let mut t = lock(t);
            let id = t.id();
            let r = match saved.get(i) {
                Some(s) => t.reacquire(&s.0),
                None => Err("no saved state".into()),
            };
            if let Err(e) = r {
                tracing::error!(device = id, error = %e, "cannot take the device back after a failed migration");
                errors.push(format!("{id}: {e}"));
            }
        }
        errors
    }
}
