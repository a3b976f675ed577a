//! virtio-net over a tap device: queue 0 receives (tap → guest), queue 1 transmits (guest → tap).
//! No offloads are offered, so every frame is a plain Ethernet frame behind a zero virtio-net
//! header, which the tap adds and strips itself.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::tap::{Tap, VNET_HDR_LEN};
use super::worker::{QueueHandler, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_USED_RING,
    TYPE_NET,
};
use crate::memory::GuestMemory;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Header plus the largest frame a guest without offloads sends (1514, with VLAN tag 1518), with
/// room to spare for jumbo-frame MTUs up to 64 KiB.
const MAX_FRAME: usize = VNET_HDR_LEN + 65536;

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    worker: Option<Worker<NetQueues>>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            worker: None,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let tx = ctx.queues.remove(TX);
        let rx = ctx.queues.remove(RX);
        let tap = self.tap.try_clone().map_err(ActivateError::Worker)?;
        let q = NetQueues {
            mem: ctx.mem,
            rx,
            tx,
            tap,
            interrupt: ctx.interrupt,
            pending: None,
            buf: vec![0u8; MAX_FRAME],
        };
        self.worker =
            Some(Worker::spawn("virtio-net", ctx.queue_evts, q).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
    fn name(&self) -> &'static str {
        "virtio-net"
    }
}

pub struct NetQueues {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    tap: Tap,
    interrupt: Arc<Interrupt>,
    /// A frame read from the tap that found no guest buffer yet.
    pending: Option<usize>,
    buf: Vec<u8>,
}

impl NetQueues {
    /// Moves frames from the tap into the guest's receive buffers until either runs out.
    fn receive(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-net: tap read failed");
                        break;
                    }
                },
            };
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                // No buffer: keep the frame; the driver's next rx kick resumes.
                self.pending = Some(len);
                break;
            };
            self.pending = None;
            let head = chain.head_index();
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= len => match w.write_all(&self.buf[..len]) {
                    Ok(()) => len as u32,
                    Err(_) => 0,
                },
                Ok(w) => {
                    tracing::debug!(
                        frame = len,
                        buffer = w.available_bytes(),
                        "virtio-net: rx buffer too small; frame dropped"
                    );
                    0
                }
                Err(_) => {
                    tracing::debug!("virtio-net: rx chain outside guest memory");
                    0
                }
            };
            if let Err(e) = self.rx.add_used(&mem, head, written) {
                tracing::warn!(error = ?e, "virtio-net: cannot return an rx buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match chain.reader(&mem) {
                Ok(mut r) => {
                    let len = r.available_bytes();
                    if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
                        tracing::debug!(len, "virtio-net: tx frame of impossible size dropped");
                    } else if r.read_exact(&mut self.buf[..len]).is_ok() {
                        if let Err(e) = self.tap.write_frame(&self.buf[..len]) {
                            // A full tap queue drops the frame, as a NIC would.
                            tracing::debug!(error = %e, "virtio-net: tap write failed; frame dropped");
                        }
                    }
                }
                Err(_) => tracing::debug!("virtio-net: tx chain outside guest memory"),
            }
            if let Err(e) = self.tx.add_used(&mem, head, 0) {
                tracing::warn!(error = ?e, "virtio-net: cannot return a tx buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }
}

impl QueueHandler for NetQueues {
    fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, EventSet)> {
        vec![(
            self.tap.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )]
    }
    fn queue_event(&mut self, index: usize) {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
    }
    fn backend_event(&mut self, _index: usize, _events: EventSet) {
        self.receive();
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A random, locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    let _ = super::rng::fill_random(&mut mac);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:zz"), None);
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02);
    }
}
