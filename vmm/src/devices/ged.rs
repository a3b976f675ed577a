//! ACPI Generic Event Device: a 32-bit event register the guest's `_EVT` method reads (and thereby
//! clears) after the GED interrupt. Used for the power button and CPU hotplug (memory hotplug later).

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use serde::{Deserialize, Serialize};

use crate::migration::{MigrationError, Pausable, Snapshottable, State};

/// Event bit: power button pressed. The DSDT's `_EVT` tests the same bit.
pub const POWER_BUTTON_BIT: u32 = 1 << 0;
/// Event bit: a vCPU was inserted or is asked to go; `_EVT` calls the CPU scan (`CSCN`).
pub const CPU_HOTPLUG_BIT: u32 = 1 << 1;

pub struct Ged {
    pending: u32,
    irq: EventFd,
}

impl Ged {
    pub fn new(irq: EventFd) -> Self {
        Ged { pending: 0, irq }
    }

    /// Latches `bits` and interrupts the guest.
    pub fn notify(&mut self, bits: u32) -> std::io::Result<()> {
        self.pending |= bits;
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 0 {
            std::mem::take(&mut self.pending)
        } else {
            0
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, ?data, "write to read-only GED register ignored");
    }
}

/// A latch the guest reads: no activity of its own to stop.
impl Pausable for Ged {
    fn pause(&self) -> Result<(), MigrationError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), MigrationError> {
        Ok(())
    }
}

/// Events latched but not yet read by the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GedState {
    pub pending: u32,
}

impl State for GedState {
    const NAME: &'static str = "ged";
    const VERSION: u32 = 2;
}

impl Snapshottable for Ged {
    type State = GedState;

    fn save(&self) -> Result<GedState, MigrationError> {
        Ok(GedState {
            pending: self.pending,
        })
    }
    fn restore(&mut self, s: GedState) -> Result<(), MigrationError> {
        self.pending = s.pending;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_clears_pending() {
        let irq = EventFd::new(0).unwrap();
        let mut g = Ged::new(irq.try_clone().unwrap());
        g.notify(POWER_BUTTON_BIT).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut d = [0u8; 4];
        g.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), POWER_BUTTON_BIT);
        g.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }

    #[test]
    fn pending_events_survive_a_snapshot() {
        let mut g = Ged::new(EventFd::new(0).unwrap());
        g.notify(POWER_BUTTON_BIT).unwrap();
        let s = g.snapshot().unwrap();
        let mut h = Ged::new(EventFd::new(0).unwrap());
        h.restore_snapshot(s).unwrap();
        let mut d = [0u8; 4];
        h.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), POWER_BUTTON_BIT);
    }
}
