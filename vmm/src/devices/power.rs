//! The ways a guest ends the VM: the ACPI sleep control register (S5 = power off), the ACPI reset
//! register, the i8042 reset line, and a debug-exit port for test guests. Each reports an
//! [`ExitReason`] to the VMM through a channel; the VMM decides what to do with it.

use std::sync::mpsc::Sender;

use super::BusDevice;
use crate::arch::layout::{ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};
use crate::migration::{MigrationError, Pausable, Snapshottable};
use crate::vmm::VmmEvent;

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// ACPI reset register or i8042 reset.
    Reset,
    /// A byte written to the debug-exit port.
    DebugExit(u8),
}

impl ExitReason {
    /// The VMM's process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset => 0,
            ExitReason::DebugExit(v) => i32::from(*v),
        }
    }
}

const SLP_EN: u8 = 1 << 5;
const I8042_RESET_CMD: u8 = 0xfe;

/// ACPI hardware-reduced sleep control (offset 0), sleep status (offset 1) and reset (offset 2).
pub struct AcpiPm {
    events: Sender<VmmEvent>,
}

impl AcpiPm {
    pub fn new(events: Sender<VmmEvent>) -> Self {
        AcpiPm { events }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken"; nothing else is readable.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 => {
                let slp_typ = (v >> 2) & 0x7;
                if slp_typ == ACPI_S5_SLEEP_TYPE {
                    let _ = self.events.send(VmmEvent::GuestExit(ExitReason::PowerOff));
                } else {
                    tracing::debug!(slp_typ, "unsupported ACPI sleep state ignored");
                }
            }
            2 if v == ACPI_RESET_VALUE => {
                let _ = self.events.send(VmmEvent::GuestExit(ExitReason::Reset));
            }
            _ => tracing::debug!(offset, value = v, "ignored ACPI PM write"),
        }
    }
}

/// Just enough of an i8042 for the reset line (command 0xfe on port 0x64).
pub struct I8042 {
    events: Sender<VmmEvent>,
}

impl I8042 {
    pub fn new(events: Sender<VmmEvent>) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&I8042_RESET_CMD) {
            let _ = self.events.send(VmmEvent::GuestExit(ExitReason::Reset));
        }
    }
}

/// Debug-exit port: the byte written becomes the VMM's exit status.
pub struct DebugExit {
    events: Sender<VmmEvent>,
}

impl DebugExit {
    pub fn new(events: Sender<VmmEvent>) -> Self {
        DebugExit { events }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let _ = self
                .events
                .send(VmmEvent::GuestExit(ExitReason::DebugExit(v)));
        }
    }
}

// Stateless devices: nothing to save beyond their presence, but they take part in pause/snapshot
// like every other device so that the machine-wide walk needs no exceptions.
macro_rules! stateless_snapshot {
    ($($t:ty => $id:literal),* $(,)?) => {$(
        impl Pausable for $t {}
        impl Snapshottable for $t {
            type State = ();
            const STATE_VERSION: u32 = 1;
            fn id(&self) -> String {
                $id.into()
            }
            fn save(&mut self) -> Result<(), MigrationError> {
                Ok(())
            }
            fn restore(&mut self, _: ()) -> Result<(), MigrationError> {
                Ok(())
            }
        }
    )*};
}

stateless_snapshot!(AcpiPm => "acpi-pm", I8042 => "i8042", DebugExit => "debug-exit");

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn exit_of(rx: &std::sync::mpsc::Receiver<VmmEvent>) -> Option<ExitReason> {
        match rx.try_recv() {
            Ok(VmmEvent::GuestExit(r)) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn s5_powers_off_other_states_do_not() {
        let (tx, rx) = channel();
        let mut pm = AcpiPm::new(tx);
        pm.write(0, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit_of(&rx), None);
        pm.write(0, &[ACPI_S5_SLEEP_TYPE << 2]);
        assert_eq!(exit_of(&rx), None, "SLP_EN not set");
        pm.write(0, &[(ACPI_S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit_of(&rx), Some(ExitReason::PowerOff));
        pm.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reset));
    }

    #[test]
    fn i8042_and_debug_exit() {
        let (tx, rx) = channel();
        let mut k = I8042::new(tx.clone());
        k.write(0, &[0x01]);
        assert_eq!(exit_of(&rx), None);
        k.write(0, &[0xfe]);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reset));
        let mut d = DebugExit::new(tx);
        d.write(0, &[3]);
        let r = exit_of(&rx).unwrap();
        assert_eq!(r.exit_code(), 3);
    }
}
