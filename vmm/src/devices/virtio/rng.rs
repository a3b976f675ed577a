//! virtio-rng: fills the guest's buffers from the host's getrandom(2), so guests never stall on
//! entropy at boot.

use std::io::Write;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::worker::{QueueHandler, Worker};
use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_USED_RING, TYPE_RNG};
use crate::memory::SharedMemory;
use vm_memory::GuestAddressSpace;

/// Largest single buffer filled; a guest asking for more gets this much.
const MAX_FILL: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    worker: Option<Worker<RngQueue>>,
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let q = self.handler(&mut ctx)?;
        self.worker =
            Some(Worker::spawn("virtio-rng", ctx.queue_evts, q).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
    fn name(&self) -> &'static str {
        "virtio-rng"
    }
    worker_access!();
}

impl Rng {
    fn handler(&mut self, ctx: &mut ActivateContext) -> Result<RngQueue, ActivateError> {
        Ok(RngQueue {
            mem: ctx.mem.clone(),
            queue: ctx.queues.remove(0),
            interrupt: ctx.interrupt.clone(),
        })
    }
}

/// Fills `buf` from getrandom(2).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most rest.len() bytes into a valid, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

pub struct RngQueue {
    mem: SharedMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

impl QueueHandler for RngQueue {
    fn queues(&self) -> Vec<(usize, &Queue)> {
        vec![(0, &self.queue)]
    }
    fn queue_event(&mut self, _index: usize) {
        let mem = self.mem.memory();
        let mut used = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let len = match chain.writer(&*mem) {
                Ok(mut w) => {
                    let mut buf = vec![0u8; w.available_bytes().min(MAX_FILL)];
                    match fill_random(&mut buf).and_then(|_| w.write_all(&buf)) {
                        Ok(()) => buf.len() as u32,
                        Err(e) => {
                            tracing::warn!(error = %e, "virtio-rng: cannot fill buffer");
                            0
                        }
                    }
                }
                Err(_) => {
                    tracing::debug!("virtio-rng: descriptor chain outside guest memory");
                    0
                }
            };
            if let Err(e) = self.queue.add_used(&*mem, head, len) {
                tracing::warn!(error = ?e, "virtio-rng: cannot return a used buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }
}
