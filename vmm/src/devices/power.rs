//! The ways a guest ends the VM: the ACPI sleep control register (S5 = power off), the ACPI reset
//! register, the i8042 reset line, and a debug-exit port for test guests. Each reports an
//! [`ExitReason`] through the [`ExitSignal`] it was given; the VMM decides what to do with it.
//! They hold no state and have no activity of their own, so they take no part in pause or
//! snapshot: a restored VM gets fresh ones.

use std::sync::Arc;

use super::BusDevice;
use crate::arch::layout::{ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// ACPI reset register or i8042 reset.
    Reset,
    /// A byte written to the debug-exit port.
    DebugExit(u8),
    /// A vCPU cannot go on (triple fault, failed entry): what happened, with its registers.
    Failed(String),
}

impl ExitReason {
    /// The VMM's process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset => 0,
            ExitReason::DebugExit(v) => i32::from(*v),
            ExitReason::Failed(_) => 1,
        }
    }
}

/// How devices and vCPU threads say the guest has stopped. The machine's builder makes it and
/// hands a clone to each; they never see the VMM's own event type (no import cycle back to it).
#[derive(Clone)]
pub struct ExitSignal(Arc<dyn Fn(ExitReason) + Send + Sync>);

impl ExitSignal {
    pub fn new(f: impl Fn(ExitReason) + Send + Sync + 'static) -> Self {
        ExitSignal(Arc::new(f))
    }

    pub fn signal(&self, why: ExitReason) {
        (self.0)(why)
    }
}

const SLP_EN: u8 = 1 << 5;
const I8042_RESET_CMD: u8 = 0xfe;

/// ACPI hardware-reduced sleep control (offset 0), sleep status (offset 1) and reset (offset 2).
pub struct AcpiPm {
    exit: ExitSignal,
}

impl AcpiPm {
    pub fn new(exit: ExitSignal) -> Self {
        AcpiPm { exit }
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
                    self.exit.signal(ExitReason::PowerOff);
                } else {
                    tracing::debug!(slp_typ, "unsupported ACPI sleep state ignored");
                }
            }
            2 if v == ACPI_RESET_VALUE => self.exit.signal(ExitReason::Reset),
            _ => tracing::debug!(offset, value = v, "ignored ACPI PM write"),
        }
    }
}

/// Just enough of an i8042 for the reset line (command 0xfe on port 0x64).
pub struct I8042 {
    exit: ExitSignal,
}

impl I8042 {
    pub fn new(exit: ExitSignal) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&I8042_RESET_CMD) {
            self.exit.signal(ExitReason::Reset);
        }
    }
}

/// Debug-exit port: the byte written becomes the VMM's exit status.
pub struct DebugExit {
    exit: ExitSignal,
}

impl DebugExit {
    pub fn new(exit: ExitSignal) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.exit.signal(ExitReason::DebugExit(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};

    fn signal() -> (ExitSignal, Receiver<ExitReason>) {
        let (tx, rx) = channel();
        (
            ExitSignal::new(move |r| {
                let _ = tx.send(r);
            }),
            rx,
        )
    }

    fn exit_of(rx: &Receiver<ExitReason>) -> Option<ExitReason> {
        rx.try_recv().ok()
    }

    #[test]
    fn s5_powers_off_other_states_do_not() {
        let (tx, rx) = signal();
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
        let (tx, rx) = signal();
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
