//! The virtio-mmio transport (virtio 1.x, register layout "version 2"): a 4 KiB window per device,
//! declared to the guest in the DSDT as `LNRO0005`.
//!
//! The driver negotiates features, sets up queues and writes DRIVER_OK; then the device is
//! activated with its queues. Whatever the driver does wrongly (bad queue sizes or addresses,
//! unoffered features, register writes at the wrong time) is logged and refused: FEATURES_OK is not
//! accepted, or the device sets DEVICE_NEEDS_RESET — never a VMM crash.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, DeviceState, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1,
};
use crate::devices::BusDevice;
use crate::memory::SharedMemory;
use crate::migration::{MigrationError, Snapshottable, State};
use vm_memory::GuestAddressSpace;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c46_4c46; // "FLFL"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

pub struct MmioTransport {
    /// `virtio<N>`: the device's place, which is also its id in snapshots.
    id: String,
    device: Box<dyn VirtioDevice>,
    mem: SharedMemory,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// Restored with DRIVER_OK but not running yet: activated on resume, so a VM restored paused
    /// has devices that hold still too.
    activate_on_resume: bool,
}

/// One queue as the driver set it up, and how far the device got with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueSave {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// The transport's registers, its queues and the device's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSave>,
    pub device: DeviceState,
}

impl State for TransportState {
    const NAME: &'static str = "virtio";
    const VERSION: u32 = 2;
}

impl MmioTransport {
    /// `queue_evts` must be registered as ioeventfds on this device's QueueNotify register, one per
    /// queue with the queue index as datamatch.
    pub fn new(
        id: String,
        device: Box<dyn VirtioDevice>,
        mem: SharedMemory,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            id,
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activate_on_resume: false,
        }
    }

    /// Whether the driver has the device running (DRIVER_OK, no reset needed).
    fn live(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
            && self.status & (STATUS_NEEDS_RESET | STATUS_FAILED) == 0
    }

    /// Hands the device's queues to it and starts its worker.
    fn activate(&mut self) -> Result<(), String> {
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&*self.mem.memory()))
        {
            return Err(format!("queue {i} is invalid"));
        }
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("queue state: {e:?}"))?;
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot clone queue eventfds: {e}"))?;
        self.device
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                queue_evts,
                interrupt: self.interrupt.clone(),
                acked_features: self.driver_features,
            })
            .map_err(|e| e.to_string())
    }

    /// Migration handover: stops the device and lets go of its host resources (disk lock, tap,
    /// socket), keeping `state` to take them back with [`MmioTransport::reacquire`].
    pub fn release(&mut self) {
        self.device.reset();
        self.device.release_backend();
    }

    /// The migration failed: takes the host resources back and continues from `state` (saved at
    /// the handover). A device that cannot is left needing a reset, and the error is returned.
    pub fn reacquire(&mut self, state: &TransportState) -> Result<(), String> {
        let r = self
            .device
            .reacquire_backend()
            .and_then(|()| self.restore(state.clone()).map_err(|e| e.to_string()))
            .and_then(|()| self.resume().map_err(|e| e.to_string()));
        if let Err(e) = &r {
            self.needs_reset(e);
        }
        r
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn announce(&self) -> std::io::Result<()> {
        self.device.announce()
    }

    pub fn disk(&self) -> Option<super::block::DiskView> {
        self.device.disk()
    }

    pub fn device(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device changed its config space: bump the generation and tell the driver.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal(INT_CONFIG);
    }

    fn offered(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activate_on_resume = false;
        self.interrupt.ack(u32::MAX);
    }

    fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            device = self.device.name(),
            why,
            "virtio device needs reset"
        );
        self.status |= STATUS_NEEDS_RESET;
        self.config_changed();
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.offered();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::debug!(
                    device = self.device.name(),
                    driver = format_args!("{:#x}", self.driver_features),
                    offered = format_args!("{offered:#x}"),
                    "FEATURES_OK refused"
                );
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 {
            if v & STATUS_FEATURES_OK == 0 {
                self.status = v;
                self.needs_reset("DRIVER_OK without FEATURES_OK");
                return;
            }
            if let Err(e) = self.activate() {
                self.status = v;
                self.needs_reset(&e);
                return;
            }
        }
        self.status = v;
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    device = self.device.name(),
                    offset,
                    "read of unknown virtio-mmio register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let driver_ok = self.status & STATUS_DRIVER_OK != 0;
        let queue_setup = matches!(
            offset,
            reg::QUEUE_NUM
                | reg::QUEUE_READY
                | reg::QUEUE_DESC_LOW
                | reg::QUEUE_DESC_HIGH
                | reg::QUEUE_AVAIL_LOW
                | reg::QUEUE_AVAIL_HIGH
                | reg::QUEUE_USED_LOW
                | reg::QUEUE_USED_HIGH
        );
        if queue_setup && driver_ok {
            tracing::debug!(
                device = self.device.name(),
                offset,
                "queue setup after DRIVER_OK ignored"
            );
            return;
        }
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    tracing::debug!("feature write after FEATURES_OK ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue() {
                    // virtio-queue refuses sizes that are not powers of two or exceed the maximum;
                    // the queue then stays invalid and DRIVER_OK will flag NEEDS_RESET.
                    if let Err(e) = q.try_set_size(v as u16) {
                        tracing::debug!(size = v, error = ?e, "invalid queue size");
                        q.set_size(0);
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_AVAIL_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_AVAIL_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_USED_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => {
                // Normally an ioeventfd catches this in KVM. Without one (or before DRIVER_OK) the
                // kick is passed on by hand, or dropped before the device is live.
                match self.queue_evts.get(v as usize) {
                    Some(e) if driver_ok => {
                        let _ = e.write(1);
                    }
                    _ => tracing::debug!(
                        device = self.device.name(),
                        queue = v,
                        "notify ignored (not DRIVER_OK or no such queue)"
                    ),
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => tracing::debug!(
                device = self.device.name(),
                offset,
                value = v,
                "write to unknown virtio-mmio register"
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "misaligned virtio-mmio register read"
            );
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
        } else if let (4, 0, Ok(b)) = (data.len(), offset % 4, <[u8; 4]>::try_from(data)) {
            self.write_reg(offset, u32::from_le_bytes(b));
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "misaligned virtio-mmio register write"
            );
        }
    }
}

/// Pausing a virtio device stops its worker (the transport's registers only change on guest
/// accesses, which stopped vCPUs do not make). Called with the transport locked, through
/// `VirtioDevices`, which is the `Pausable` of them all.
impl MmioTransport {
    pub fn pause(&mut self) -> Result<(), MigrationError> {
        if let Some(w) = self.device.worker_mut() {
            w.pause();
        }
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), MigrationError> {
        if std::mem::take(&mut self.activate_on_resume) {
            return self.activate().map_err(|reason| MigrationError::Restore {
                id: self.id.clone(),
                reason,
            });
        }
        if let Some(w) = self.device.worker_mut() {
            w.resume().map_err(|e| MigrationError::Restore {
                id: self.id.clone(),
                reason: format!("cannot restart the worker: {e}"),
            })?;
        }
        Ok(())
    }
}

impl MmioTransport {
    /// The name logs and errors give this device (`virtio0`, …: its place on the bus).
    pub fn id(&self) -> String {
        self.id.clone()
    }
}

impl Snapshottable for MmioTransport {
    type State = TransportState;

    /// Exact only while paused: a running worker moves its queues on.
    fn save(&self) -> Result<TransportState, MigrationError> {
        let positions = self
            .device
            .worker()
            .map(|w| w.positions())
            .unwrap_or_default();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) = positions
                    .iter()
                    .find(|p| p.index == i)
                    .map_or((q.next_avail(), q.next_used()), |p| {
                        (p.next_avail, p.next_used)
                    });
                let s = q.state();
                QueueSave {
                    max_size: s.max_size,
                    size: s.size,
                    ready: s.ready,
                    desc_table: s.desc_table,
                    avail_ring: s.avail_ring,
                    used_ring: s.used_ring,
                    next_avail,
                    next_used,
                    event_idx: s.event_idx_enabled,
                }
            })
            .collect();
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
            device: self.device.save_state(),
        })
    }

    /// Loads the registers and queues; a live device starts on [`Pausable::resume`].
    fn restore(&mut self, s: TransportState) -> Result<(), MigrationError> {
        let err = |reason: String| MigrationError::Restore {
            id: self.id.clone(),
            reason,
        };
        if s.device_type != self.device.device_type() {
            return Err(err(format!(
                "saved device type {} but this VM has type {} here",
                s.device_type,
                self.device.device_type()
            )));
        }
        if s.queues.len() != self.queues.len() {
            return Err(err(format!(
                "{} saved queues for a device with {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::new();
        for (i, (saved, q)) in s.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(err(format!(
                    "queue {i}: saved maximum size {} but the device has {}",
                    saved.max_size,
                    q.max_size()
                )));
            }
            let mut nq =
                Queue::new(saved.max_size).map_err(|e| err(format!("queue {i}: {e:?}")))?;
            if nq.try_set_size(saved.size).is_err() {
                nq.set_size(0);
            }
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (lo, hi) = split(saved.desc_table);
            nq.set_desc_table_address(lo, hi);
            let (lo, hi) = split(saved.avail_ring);
            nq.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(saved.used_ring);
            nq.set_used_ring_address(lo, hi);
            nq.set_next_avail(saved.next_avail);
            nq.set_next_used(saved.next_used);
            nq.set_event_idx(saved.event_idx);
            nq.set_ready(saved.ready);
            queues.push(nq);
        }
        self.device.reset();
        self.device.restore_state(s.device).map_err(err)?;
        self.queues = queues;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt.ack(u32::MAX);
        self.interrupt.set(s.interrupt_status);
        self.activate_on_resume = self.live();
        Ok(())
    }
}
