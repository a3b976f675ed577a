//! COM1: a 16550A UART (vm-superio) whose interrupt is an irqfd on GSI 4. Output goes to stdout or a
//! file; input comes from stdin on a thread of its own.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{lock, BusDevice};
use crate::migration::{MigrationError, Pausable, Snapshottable, State};

/// The UART's interrupt line: an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type Output = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Output>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Output) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Flushes buffered console output (at exit).
    pub fn flush_output(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// Queues input bytes for the guest; returns how many fitted in the FIFO.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = ?e, "serial input dropped");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // `rep outsb` arrives as one exit with several bytes: each is one register write.
        for b in data {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                tracing::debug!(error = ?e, offset, "serial write failed");
            }
        }
    }
}

/// Feeds stdin to the UART until stdin closes. Waits while the guest's FIFO is full.
pub fn spawn_stdin_reader(dev: Arc<Mutex<SerialDevice>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = lock(&dev).enqueue(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })?;
    Ok(())
}

/// The UART registers and unread input, as saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

/// Nothing runs on its own: output is written by the vCPU that writes the register, and input
/// waits in the UART until a vCPU reads it, so stopped vCPUs stop the device.
impl Pausable for SerialDevice {
    fn pause(&self) -> Result<(), MigrationError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), MigrationError> {
        Ok(())
    }
}

impl State for SerialSnapshot {
    const NAME: &'static str = "serial";
    const VERSION: u32 = 1;
}

impl Snapshottable for SerialDevice {
    type State = SerialSnapshot;

    fn save(&self) -> Result<SerialSnapshot, MigrationError> {
        let s = self.uart.state();
        Ok(SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        })
    }

    fn restore(&mut self, s: SerialSnapshot) -> Result<(), MigrationError> {
        let r = s.regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer,
        };
        // Rebuild the UART around the same interrupt line and output.
        let placeholder = Serial::new(
            IrqTrigger(EventFd::new(0).map_err(|e| MigrationError::Restore {
                id: "serial0".into(),
                reason: e.to_string(),
            })?),
            Box::new(std::io::sink()) as Output,
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        let irq =
            IrqTrigger(
                old.interrupt_evt()
                    .0
                    .try_clone()
                    .map_err(|e| MigrationError::Restore {
                        id: "serial0".into(),
                        reason: e.to_string(),
                    })?,
            );
        let out = old.into_writer();
        self.uart = Serial::from_state(&state, irq, NoEvents, out).map_err(|e| {
            MigrationError::Restore {
                id: "serial0".into(),
                reason: format!("{e:?}"),
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_string_io() {
        let cap = Capture::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(cap.clone()));
        s.write(0, b"hi");
        s.write(0, b"!");
        assert_eq!(&*cap.0.lock().unwrap(), b"hi!");
    }

    #[test]
    fn snapshot_round_trip_keeps_registers_and_input() {
        let cap = Capture::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(cap.clone()));
        s.write(7, &[0x5a]); // scratch register
        s.write(1, &[0x01]); // IER: rx data interrupt
        s.enqueue(b"ab");
        // Through the snapshot's JSON form, as a restore reads it.
        let json = serde_json::to_string(&s.snapshot().unwrap()).unwrap();
        let mut t = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(cap.clone()));
        t.restore_snapshot(serde_json::from_str(&json).unwrap())
            .unwrap();
        let mut b = [0u8];
        t.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        t.read(0, &mut b);
        assert_eq!(b[0], b'a');
        t.write(0, b"x");
        assert_eq!(&*cap.0.lock().unwrap(), b"x");
    }
}
