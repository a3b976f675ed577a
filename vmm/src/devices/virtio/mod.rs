//! virtio 1.x devices on the virtio-mmio transport ("version 2" registers).
//!
//! A device implements [`VirtioDevice`]: its features, config space and queue sizes, and what to do
//! when the driver sets DRIVER_OK ([`VirtioDevice::activate`]): it gets the queues, one eventfd per
//! queue (KVM ioeventfds on QueueNotify, so a kick never exits to userspace) and the interrupt, and
//! processes them on a worker thread of its own ([`worker`]), off the vCPU threads.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid (size, alignment or addresses)")]
    InvalidQueue(usize),
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("{0}")]
    Device(String),
}

/// A device's interrupt line: the InterruptStatus bits and the irqfd that raises the GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!(error = %e, "cannot raise virtio interrupt");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub acked_features: u64,
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is the slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Config writes; most devices have a read-only config.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, ?data, "write to read-only virtio config ignored");
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the worker and forgets the queues (driver reset).
    fn reset(&mut self);
    /// A short name for logs and snapshots.
    fn name(&self) -> &'static str;
}

/// Copies `bytes[offset..]` into `data` (config space reads), zero-filling past the end.
pub fn read_config_bytes(bytes: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}
