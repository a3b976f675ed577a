//! The virtio-mmio transport (virtio 1.x, register layout "version 2"): a 4 KiB window per device,
//! declared to the guest in the DSDT as `LNRO0005`.
//!
//! The driver negotiates features, sets up queues and writes DRIVER_OK; then the device is
//! activated with its queues. Whatever the driver does wrongly (bad queue sizes or addresses,
//! unoffered features, register writes at the wrong time) is logged and refused: FEATURES_OK is not
//! accepted, or the device sets DEVICE_NEEDS_RESET — never a VMM crash.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMemory;

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
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// `queue_evts` must be registered as ioeventfds on this device's QueueNotify register, one per
    /// queue with the queue index as datamatch.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
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
        }
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
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
            if let Some(i) = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&self.mem))
            {
                self.status = v;
                self.needs_reset(&format!("queue {i} is invalid"));
                return;
            }
            let queues = match self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect()
            {
                Ok(q) => q,
                Err(e) => {
                    self.status = v;
                    self.needs_reset(&format!("queue state: {e:?}"));
                    return;
                }
            };
            let ctx = ActivateContext {
                mem: self.mem.clone(),
                queues,
                queue_evts: match self.queue_evts.iter().map(EventFd::try_clone).collect() {
                    Ok(e) => e,
                    Err(e) => {
                        self.status = v;
                        self.needs_reset(&format!("cannot clone queue eventfds: {e}"));
                        return;
                    }
                },
                interrupt: self.interrupt.clone(),
                acked_features: self.driver_features,
            };
            if let Err(e) = self.device.activate(ctx) {
                self.status = v;
                self.needs_reset(&e.to_string());
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
