//! Emulated devices and the buses that route a vCPU's port I/O and MMIO exits to them.
//!
//! A device sees only offsets within its own window, so it can be unit-tested without KVM.
//! Accesses that hit no device are logged at debug level and ignored (reads return all ones), as on
//! real hardware: a guest probing for absent devices is not an error.

pub mod console_log;
pub mod cpu_hotplug;
pub mod ged;
pub mod manager;
pub mod power;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on a bus: reads and writes at an offset into its window.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus window {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus window at {0:#x} has zero length")]
    Empty(u64),
}

/// An address space (port I/O or MMIO) with devices at non-overlapping windows.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Routes a read; returns false (and fills all ones) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                tracing::debug!(
                    addr = format_args!("{addr:#x}"),
                    len = data.len(),
                    "read from no device"
                );
                false
            }
        }
    }

    /// Routes a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                lock(dev).write(off, data);
                true
            }
            None => {
                tracing::debug!(
                    addr = format_args!("{addr:#x}"),
                    ?data,
                    "write to no device"
                );
                false
            }
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in one access must not wedge the VM.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_window() {
        let mut bus = Bus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(1)))).unwrap();
        bus.insert(0x20, 1, Arc::new(Mutex::new(Reg(9)))).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x20, &[5]));
        assert!(bus.read(0x20, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x14, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.read(0x0, &mut b));
    }

    #[test]
    fn refuses_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(0)))).unwrap();
        assert!(bus.insert(0x13, 2, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0x0e, 3, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0x14, 1, Arc::new(Mutex::new(Reg(0)))).is_ok());
        assert_eq!(
            bus.insert(0x40, 0, Arc::new(Mutex::new(Reg(0)))),
            Err(BusError::Empty(0x40))
        );
    }
}
