//! virtio 1.x devices on the virtio-mmio transport ("version 2" registers).
//!
//! A device implements [`VirtioDevice`]: its features, config space and queue sizes, and what to do
//! when the driver sets DRIVER_OK ([`VirtioDevice::activate`]): it gets the queues, one eventfd per
//! queue (KVM ioeventfds on QueueNotify, so a kick never exits to userspace) and the interrupt, and
//! processes them on a worker thread of its own ([`worker`]), off the vCPU threads.

/// The [`VirtioDevice`] methods that hand out a device's `worker: Option<Worker<_>>` field and
/// its queue handler without a worker (built by the device's own `handler` method, which
/// `activate` runs on the worker), the same in every device.
macro_rules! worker_access {
    () => {
        fn detached(
            &mut self,
            mut ctx: super::ActivateContext,
        ) -> Result<Box<dyn super::worker::QueueHandler>, super::ActivateError> {
            Ok(Box::new(self.handler(&mut ctx)?))
        }
        fn worker(&self) -> Option<&dyn super::worker::WorkerControl> {
            self.worker
                .as_ref()
                .map(|w| w as &dyn super::worker::WorkerControl)
        }
        fn worker_mut(&mut self) -> Option<&mut dyn super::worker::WorkerControl> {
            self.worker
                .as_mut()
                .map(|w| w as &mut dyn super::worker::WorkerControl)
        }
    };
}

pub mod balloon;
pub mod block;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{GuestMemory, SharedMemory};
use worker::WorkerControl;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_MEM: u32 = 24;

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

    /// Sets bits without raising the interrupt (restoring a snapshot: the interrupt controllers
    /// already hold whatever was pending).
    pub fn set(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: SharedMemory,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub acked_features: u64,
}

/// What a virtio device keeps beyond its transport's registers and queues, one variant per
/// device that has any.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    #[default]
    None,
    Balloon(balloon::BalloonState),
    Mem(mem::MemState),
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
    /// The queue handler [`VirtioDevice::activate`] runs on the device's worker thread, with no
    /// thread around it: what the fuzz targets (`vmm/fuzz`) drive, one event at a time.
    #[doc(hidden)]
    fn detached(
        &mut self,
        ctx: ActivateContext,
    ) -> Result<Box<dyn worker::QueueHandler>, ActivateError>;
    /// The worker, once activated: pause/resume and the queues' positions.
    fn worker(&self) -> Option<&dyn WorkerControl>;
    fn worker_mut(&mut self) -> Option<&mut dyn WorkerControl>;
    /// Device state beyond the transport registers and queues (the balloon's target); most
    /// devices keep everything in their queues.
    fn save_state(&self) -> DeviceState {
        DeviceState::None
    }
    /// Takes back what [`VirtioDevice::save_state`] gave, before the device is re-activated.
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        match state {
            DeviceState::None => Ok(()),
            other => Err(format!("{} cannot take {other:?}", self.name())),
        }
    }
    /// A writable disk's image and write log, for checkpoints; other devices have none.
    fn disk(&self) -> Option<block::DiskView> {
        None
    }
    /// Lets go of the host resources the migration target takes over (disk lock, tap, socket).
    /// The device is reset (worker gone) when this is called.
    fn release_backend(&mut self) {}
    /// Takes them back: the migration failed and the guest runs here again.
    fn reacquire_backend(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// After a migration, tells the network where the guest is now (a NIC broadcasts a RARP
    /// with its MAC, as QEMU does, so switches learn the new port). Other devices have nothing
    /// to say.
    fn announce(&self) -> std::io::Result<()> {
        Ok(())
    }
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

/// The guest buffers of one direction of a descriptor chain as iovecs, for vectored I/O straight
/// between a backend and guest memory (no bounce buffer). `None` when a buffer lies outside guest
/// memory or straddles two regions; such a chain is malformed.
pub struct GuestIovecs<'a> {
    pub iovecs: Vec<libc::iovec>,
    pub len: usize,
    /// Writable buffers: guest memory and the ranges to mark dirty once the writes are done (on
    /// drop), so live migration copies what the device wrote.
    written: Option<(&'a GuestMemory, Vec<(GuestAddress, usize)>)>,
}

impl Drop for GuestIovecs<'_> {
    fn drop(&mut self) {
        if let Some((mem, ranges)) = &self.written {
            for &(addr, len) in ranges {
                crate::memory::mark_dirty(mem, addr, len);
            }
        }
    }
}

impl<'a> GuestIovecs<'a> {
    pub fn from_chain(
        mem: &'a GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
        writable: bool,
    ) -> Option<GuestIovecs<'a>> {
        let mut iovecs = Vec::new();
        let mut ranges = Vec::new();
        let mut len = 0usize;
        for d in chain {
            if d.is_write_only() != writable || d.len() == 0 {
                continue;
            }
            let start = mem.get_host_address(d.addr()).ok()?;
            let last = d.addr().0.checked_add(u64::from(d.len()) - 1)?;
            let end = mem.get_host_address(GuestAddress(last)).ok()?;
            // Both ends in one contiguous mapping: the buffer does not straddle regions.
            if end as usize != start as usize + d.len() as usize - 1 {
                return None;
            }
            iovecs.push(libc::iovec {
                iov_base: start.cast(),
                iov_len: d.len() as usize,
            });
            len += d.len() as usize;
            if writable {
                ranges.push((d.addr(), d.len() as usize));
            }
        }
        Some(GuestIovecs {
            iovecs,
            len,
            written: writable.then_some((mem, ranges)),
        })
    }

    /// Drops the first `n` bytes (a request header already read another way).
    pub fn skip(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let first = &mut self.iovecs[0];
            if first.iov_len <= n {
                n -= first.iov_len;
                self.iovecs.remove(0);
            } else {
                // SAFETY: stays inside the same buffer, which is longer than n.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Splits off the last `n` bytes (a trailing status byte) as their own iovecs.
    pub fn split_tail(&mut self, n: usize) -> GuestIovecs<'a> {
        let n = n.min(self.len);
        let mut keep = self.len - n;
        let mut head = Vec::new();
        let mut tail = Vec::new();
        for iov in self.iovecs.drain(..) {
            if keep >= iov.iov_len {
                keep -= iov.iov_len;
                head.push(iov);
            } else if keep > 0 {
                head.push(libc::iovec {
                    iov_base: iov.iov_base,
                    iov_len: keep,
                });
                // SAFETY: stays inside the same buffer, which is longer than `keep`.
                let rest = unsafe { iov.iov_base.cast::<u8>().add(keep) }.cast();
                tail.push(libc::iovec {
                    iov_base: rest,
                    iov_len: iov.iov_len - keep,
                });
                keep = 0;
            } else {
                tail.push(iov);
            }
        }
        self.iovecs = head;
        self.len -= n;
        // The ranges to mark stay with `self`, which outlives the tail's writes.
        GuestIovecs {
            iovecs: tail,
            len: n,
            written: None,
        }
    }

    /// Fills the buffers from `fd` at `offset` (preadv), retrying short reads.
    pub fn read_from(&mut self, fd: std::os::fd::RawFd, offset: u64) -> std::io::Result<()> {
        self.vectored(fd, offset, false)
    }

    /// Writes the buffers to `fd` at `offset` (pwritev), retrying short writes.
    pub fn write_to(&mut self, fd: std::os::fd::RawFd, offset: u64) -> std::io::Result<()> {
        self.vectored(fd, offset, true)
    }

    fn vectored(
        &mut self,
        fd: std::os::fd::RawFd,
        mut offset: u64,
        write: bool,
    ) -> std::io::Result<()> {
        let total = self.len;
        let mut done = 0;
        while done < total {
            let iovs = &self.iovecs;
            let cnt = iovs.len().min(1024) as libc::c_int;
            // SAFETY: every iovec points into mapped guest memory that outlives this call (`mem`
            // holds the mapping); the kernel copies to or from it.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, iovs.as_ptr(), cnt, offset as libc::off_t)
                } else {
                    libc::preadv(fd, iovs.as_ptr(), cnt, offset as libc::off_t)
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "short transfer",
                ));
            }
            done += n as usize;
            offset += n as u64;
            self.skip(n as usize);
            self.len = total - done;
        }
        Ok(())
    }
}

impl GuestIovecs<'_> {
    /// Copies `bytes` into the buffers; returns how many fitted.
    pub fn copy_in(&self, bytes: &[u8]) -> usize {
        let mut done = 0;
        for iov in &self.iovecs {
            for i in 0..iov.iov_len {
                let Some(&b) = bytes.get(done) else {
                    return done;
                };
                // SAFETY: i < iov_len: inside a mapped guest buffer. Volatile, as the guest may look.
                unsafe { std::ptr::write_volatile(iov.iov_base.cast::<u8>().add(i), b) };
                done += 1;
            }
        }
        done
    }
}

/// Writes `byte` at the start of `iovs` (a request's status byte).
pub fn write_status(iovs: &GuestIovecs, byte: u8) -> bool {
    match iovs.iovecs.first() {
        Some(iov) if iov.iov_len >= 1 => {
            // SAFETY: the iovec points into mapped guest memory at least one byte long.
            unsafe { std::ptr::write_volatile(iov.iov_base.cast::<u8>(), byte) };
            true
        }
        _ => false,
    }
}
