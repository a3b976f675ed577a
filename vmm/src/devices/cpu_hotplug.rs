//! The CPU hotplug controller (docs/hotplug.md): the registers the DSDT's CPU methods use to
//! find which vCPU slots are present, which were just inserted or are asked to go, and to eject
//! one. The VMM inserts a vCPU (its thread runs first, then the slot turns present and
//! "inserting") or asks for one to go ("removing"), and raises the GED's CPU event; the guest's
//! `CSCN` walks the slots, notifies its processor devices and acknowledges each flag; the guest
//! offlines a CPU it was asked to remove and calls `_EJ0`, which writes the eject bit, and only
//! then does the VMM stop that vCPU's thread.
//!
//! Registers (little endian), at `CPU_HOTPLUG_START`:
//! - `0x0` CSEL, 32 bits, read/write: the selected slot.
//! - `0x4` status, 8 bits, of the selected slot: bit 0 CPEN (present; read-only), bit 1 CINS
//!   (inserted, not yet seen by the guest; writing 1 acknowledges), bit 2 CRMV (asked to go;
//!   writing 1 acknowledges), bit 3 CEJ0 (writing 1 ejects; honoured only for a slot the VMM
//!   asked to remove, so a guest cannot take away a vCPU nobody asked for).

use serde::{Deserialize, Serialize};

use super::BusDevice;
use crate::migration::{MigrationError, Pausable, Snapshottable, State};

pub const CSEL_OFFSET: u64 = 0;
pub const STATUS_OFFSET: u64 = 4;
/// The register window the DSDT declares.
pub const REGISTERS_LEN: u64 = 8;
pub const CPEN: u8 = 1 << 0;
pub const CINS: u8 = 1 << 1;
pub const CRMV: u8 = 1 << 2;
pub const CEJ0: u8 = 1 << 3;

/// One vCPU slot as the guest sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub present: bool,
    /// Inserted, not yet acknowledged by the guest's scan.
    pub inserting: bool,
    /// Asked to go, not yet acknowledged by the guest's scan.
    pub removing: bool,
    /// Asked to go and not yet ejected: an eject is honoured only then.
    pub unplug_requested: bool,
}

/// Called with the slot the guest ejected; the VMM stops that vCPU.
pub type OnEject = Box<dyn Fn(u8) + Send>;

pub struct CpuHotplug {
    selected: u32,
    slots: Vec<Slot>,
    on_eject: OnEject,
}

impl CpuHotplug {
    /// `max` slots, the first `present` of them present.
    pub fn new(max: u8, present: u8, on_eject: OnEject) -> CpuHotplug {
        let slots = (0..max)
            .map(|i| Slot {
                present: i < present,
                ..Slot::default()
            })
            .collect();
        CpuHotplug {
            selected: 0,
            slots,
            on_eject,
        }
    }

    /// The slot's vCPU runs now: the guest is told on its next scan.
    pub fn insert(&mut self, i: u8) {
        if let Some(s) = self.slots.get_mut(usize::from(i)) {
            *s = Slot {
                present: true,
                inserting: true,
                ..Slot::default()
            };
        }
    }

    /// Asks the guest to give slot `i` back.
    pub fn request_removal(&mut self, i: u8) {
        if let Some(s) = self.slots.get_mut(usize::from(i)) {
            if s.present {
                s.removing = true;
                s.unplug_requested = true;
            }
        }
    }

    /// Forgets every removal not yet ejected: a late eject of one is then ignored.
    pub fn cancel_removals(&mut self) {
        for s in &mut self.slots {
            s.removing = false;
            s.unplug_requested = false;
        }
    }

    pub fn slot(&self, i: u8) -> Slot {
        self.slots.get(usize::from(i)).copied().unwrap_or_default()
    }

    fn status(&self) -> u8 {
        let s = self.slot_selected();
        (if s.present { CPEN } else { 0 })
            | (if s.inserting { CINS } else { 0 })
            | (if s.removing { CRMV } else { 0 })
    }

    fn slot_selected(&self) -> Slot {
        u8::try_from(self.selected).map_or(Slot::default(), |i| self.slot(i))
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u32 = match offset {
            CSEL_OFFSET => self.selected,
            STATUS_OFFSET => u32::from(self.status()),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            CSEL_OFFSET => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                self.selected = u32::from_le_bytes(b);
            }
            STATUS_OFFSET => {
                let v = data.first().copied().unwrap_or(0);
                let Ok(i) = u8::try_from(self.selected) else {
                    return;
                };
                let Some(s) = self.slots.get_mut(usize::from(i)) else {
                    tracing::debug!(slot = self.selected, "CPU hotplug write to no slot ignored");
                    return;
                };
                if v & CINS != 0 {
                    s.inserting = false;
                }
                if v & CRMV != 0 {
                    s.removing = false;
                }
                if v & CEJ0 != 0 {
                    if s.present && s.unplug_requested {
                        *s = Slot::default();
                        (self.on_eject)(i);
                    } else {
                        tracing::warn!(
                            slot = i,
                            "the guest ejected a vCPU nobody asked to remove: ignored"
                        );
                    }
                }
            }
            _ => tracing::debug!(offset, "write to no CPU hotplug register ignored"),
        }
    }
}

/// Registers only: nothing of its own runs.
impl Pausable for CpuHotplug {
    fn pause(&self) -> Result<(), MigrationError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), MigrationError> {
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuHotplugState {
    pub selected: u32,
    pub slots: Vec<Slot>,
}

impl State for CpuHotplugState {
    const NAME: &'static str = "cpu-hotplug";
    const VERSION: u32 = 1;
}

impl Snapshottable for CpuHotplug {
    type State = CpuHotplugState;

    fn save(&self) -> Result<CpuHotplugState, MigrationError> {
        Ok(CpuHotplugState {
            selected: self.selected,
            slots: self.slots.clone(),
        })
    }

    fn restore(&mut self, s: CpuHotplugState) -> Result<(), MigrationError> {
        if s.slots.len() != self.slots.len() {
            return Err(MigrationError::Restore {
                id: "cpu-hotplug".into(),
                reason: format!(
                    "{} vCPU slots saved, {} configured",
                    s.slots.len(),
                    self.slots.len()
                ),
            });
        }
        self.selected = s.selected;
        self.slots = s.slots;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn controller(max: u8, present: u8) -> (CpuHotplug, Arc<Mutex<Vec<u8>>>) {
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let e = ejected.clone();
        let c = CpuHotplug::new(max, present, Box::new(move |i| e.lock().unwrap().push(i)));
        (c, ejected)
    }

    fn status(c: &mut CpuHotplug, slot: u32) -> u8 {
        c.write(CSEL_OFFSET, &slot.to_le_bytes());
        let mut b = [0u8];
        c.read(STATUS_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn an_inserted_vcpu_is_present_and_inserting_until_acknowledged() {
        let (mut c, _) = controller(4, 1);
        assert_eq!(status(&mut c, 0), CPEN);
        assert_eq!(status(&mut c, 1), 0);
        c.insert(1);
        assert_eq!(status(&mut c, 1), CPEN | CINS);
        c.write(STATUS_OFFSET, &[CINS]);
        assert_eq!(status(&mut c, 1), CPEN);
        let mut sel = [0u8; 4];
        c.read(CSEL_OFFSET, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), 1);
    }

    #[test]
    fn only_a_vcpu_asked_to_go_can_be_ejected() {
        let (mut c, ejected) = controller(4, 3);
        // Not asked: the guest's eject changes nothing.
        status(&mut c, 1);
        c.write(STATUS_OFFSET, &[CEJ0]);
        assert_eq!(status(&mut c, 1), CPEN);
        assert!(ejected.lock().unwrap().is_empty());
        c.request_removal(2);
        assert_eq!(status(&mut c, 2), CPEN | CRMV);
        c.write(STATUS_OFFSET, &[CRMV]);
        assert_eq!(status(&mut c, 2), CPEN);
        c.write(STATUS_OFFSET, &[CEJ0]);
        assert_eq!(status(&mut c, 2), 0);
        assert_eq!(*ejected.lock().unwrap(), vec![2]);
        // Twice: nothing more.
        c.write(STATUS_OFFSET, &[CEJ0]);
        assert_eq!(*ejected.lock().unwrap(), vec![2]);
    }

    #[test]
    fn a_selection_past_the_slots_reads_nothing_and_writes_nothing() {
        let (mut c, ejected) = controller(2, 2);
        assert_eq!(status(&mut c, 7), 0);
        c.write(STATUS_OFFSET, &[CEJ0 | CINS | CRMV]);
        assert_eq!(status(&mut c, 0xffff_ffff), 0);
        c.write(STATUS_OFFSET, &[CEJ0]);
        assert!(ejected.lock().unwrap().is_empty());
        assert_eq!(status(&mut c, 1), CPEN);
    }

    #[test]
    fn the_slots_survive_a_snapshot_and_a_mismatched_one_is_refused() {
        let (mut c, _) = controller(4, 1);
        c.insert(1);
        let s = c.snapshot().unwrap();
        let (mut d, _) = controller(4, 1);
        d.restore_snapshot(s.clone()).unwrap();
        assert_eq!(status(&mut d, 1), CPEN | CINS);
        let (mut e, _) = controller(2, 1);
        assert!(e.restore_snapshot(s).is_err());
    }
}
