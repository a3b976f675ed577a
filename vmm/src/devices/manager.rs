//! Places devices in the guest: a virtio-mmio window, a GSI wired through an irqfd and one
//! ioeventfd per queue for each virtio device, and the ACPI description of each.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::virtio::mmio::{reg, MmioTransport};
use super::virtio::{Interrupt, VirtioDevice};
use super::{lock, Bus, BusError};
use crate::acpi::MmioDeviceInfo;
use crate::arch::layout::{IOAPIC_PINS, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::GuestMemory;
use crate::migration::{ComponentState, MigrationError, Pausable, Snapshottable};

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
        mem: &GuestMemory,
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

impl VirtioDevices {
    /// Stops every device's worker (after the vCPUs, so nothing new arrives).
    pub fn pause(&self) -> Result<(), MigrationError> {
        self.transports.iter().try_for_each(|t| lock(t).pause())
    }

    pub fn resume(&self) -> Result<(), MigrationError> {
        self.transports.iter().try_for_each(|t| lock(t).resume())
    }

    /// Every device's state, in attach order (ids `virtio0`, `virtio1`, …). Call while paused.
    pub fn save(&self) -> Result<Vec<ComponentState>, MigrationError> {
        self.transports.iter().map(|t| lock(t).snapshot()).collect()
    }

    /// Restores the device whose id is `state.id`; false if there is none.
    pub fn restore(&self, state: &ComponentState) -> Result<bool, MigrationError> {
        for t in &self.transports {
            let mut t = lock(t);
            if t.id() == state.id {
                t.restore_snapshot(state)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Migration handover: every device lets go of its host resources.
    pub fn release(&self) {
        self.transports.iter().for_each(|t| lock(t).release());
    }

    /// The migration failed: every device takes its resources back and continues from `saved`.
    /// Returns what could not be taken back (those devices need a reset from the driver).
    pub fn reacquire(&self, saved: &[ComponentState]) -> Vec<String> {
        let mut errors = Vec::new();
        for t in &self.transports {
            let mut t = lock(t);
            let id = t.id();
            let r = match saved.iter().find(|s| s.id == id) {
                Some(s) => t.reacquire(s),
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
