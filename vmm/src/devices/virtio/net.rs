//! virtio-net over a tap device: queue 0 receives (tap → guest), queue 1 transmits (guest → tap).
//! Frames move with one readv/writev between the tap and the guest's buffers, virtio-net header
//! included: the tap speaks the same header, so checksum and TSO offloads pass through both ways.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::worker::{QueueHandler, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, GuestIovecs, Interrupt, VirtioDevice,
    INT_USED_RING, TYPE_NET,
};
use crate::memory::SharedMemory;
use vm_memory::GuestAddressSpace;

const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Header plus the largest frame: a TSO super-frame of up to 64 KiB.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

pub struct Net {
    /// `None` while handed over to a migration target.
    tap: Option<Tap>,
    tap_name: String,
    mac: [u8; 6],
    worker: Option<Worker<NetQueues>>,
}

impl Net {
    fn handler(&mut self, ctx: &mut ActivateContext) -> Result<NetQueues, ActivateError> {
        let tap = self
            .tap
            .as_ref()
            .ok_or_else(|| ActivateError::Device(format!("tap {} is released", self.tap_name)))?
            .try_clone()
            .map_err(ActivateError::Worker)?;
        let tx = ctx.queues.remove(TX);
        let rx = ctx.queues.remove(RX);
        Ok(NetQueues {
            mem: ctx.mem.clone(),
            rx,
            tx,
            tap,
            interrupt: ctx.interrupt.clone(),
        })
    }

    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap_name: tap.name().to_string(),
            tap: Some(tap),
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
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        // What the tap may send the guest follows what the driver accepted.
        let acked = ctx.acked_features;
        let mut offload = 0;
        if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        let q = self.handler(&mut ctx)?;
        q.tap.set_offload(offload).map_err(|e| {
            ActivateError::Device(format!("tap {}: cannot set offloads: {e}", q.tap.name()))
        })?;
        self.worker =
            Some(Worker::spawn("virtio-net", ctx.queue_evts, q).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
    fn name(&self) -> &'static str {
        "virtio-net"
    }
    fn release_backend(&mut self) {
        // The worker (and its clone of the tap) is gone: this closes the last descriptor, so the
        // target can attach to the tap.
        self.tap = None;
    }
    fn reacquire_backend(&mut self) -> Result<(), String> {
        if self.tap.is_none() {
            self.tap = Some(Tap::open(&self.tap_name).map_err(|e| e.to_string())?);
        }
        Ok(())
    }
    fn announce(&self) -> std::io::Result<()> {
        let Some(tap) = &self.tap else {
            return Ok(());
        };
        let frame = rarp_frame(&self.mac);
        let iov = libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        };
        tap.writev(&[iov]).map(|_| ())
    }
    worker_access!();
}

/// A RARP "reverse request" broadcast from `mac`, behind a zero virtio-net header (the tap
/// expects one): the frame QEMU sends to announce a migrated guest. Padded to the 60-byte
/// Ethernet minimum.
fn rarp_frame(mac: &[u8; 6]) -> [u8; VNET_HDR_LEN + 60] {
    let mut f = [0u8; VNET_HDR_LEN + 60];
    let e = &mut f[VNET_HDR_LEN..];
    e[0..6].fill(0xff);
    e[6..12].copy_from_slice(mac);
    e[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    e[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    e[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    e[18] = 6;
    e[19] = 4;
    e[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    e[22..28].copy_from_slice(mac); // sender (IP 0.0.0.0)
    e[32..38].copy_from_slice(mac); // target (IP 0.0.0.0)
    f
}

pub struct NetQueues {
    mem: SharedMemory,
    rx: Queue,
    tx: Queue,
    tap: Tap,
    interrupt: Arc<Interrupt>,
}

impl NetQueues {
    /// Moves frames from the tap into the guest's receive buffers until either runs out.
    fn receive(&mut self) {
        let mem = self.mem.memory();
        let mut used = false;
        while let Some(chain) = self.rx.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let len = match GuestIovecs::from_chain(&mem, chain, true) {
                Some(iovs) if iovs.len >= VNET_HDR_LEN => match self.tap.readv(&iovs.iovecs) {
                    Ok(n) => n as u32,
                    Err(e) => {
                        // No frame waiting (or a tap error): keep the buffer for the next one.
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            tracing::warn!(error = %e, "virtio-net: tap read failed");
                        }
                        self.rx.go_to_previous_position();
                        break;
                    }
                },
                _ => {
                    tracing::debug!("virtio-net: unusable rx buffer");
                    0
                }
            };
            if let Err(e) = self.rx.add_used(&*mem, head, len) {
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
        let mem = self.mem.memory();
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            match GuestIovecs::from_chain(&mem, chain, false) {
                Some(iovs) if (VNET_HDR_LEN..=MAX_FRAME).contains(&iovs.len) => {
                    if let Err(e) = self.tap.writev(&iovs.iovecs) {
                        // A full tap queue drops the frame, as a NIC would.
                        tracing::debug!(error = %e, "virtio-net: tap write failed; frame dropped");
                    }
                }
                Some(iovs) => tracing::debug!(
                    len = iovs.len,
                    "virtio-net: tx frame of impossible size dropped"
                ),
                None => tracing::debug!("virtio-net: tx chain outside guest memory"),
            }
            if let Err(e) = self.tx.add_used(&*mem, head, 0) {
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
    fn queues(&self) -> Vec<(usize, &Queue)> {
        vec![(RX, &self.rx), (TX, &self.tx)]
    }
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

/// A random, locally administered unicast MAC.
pub fn random_mac() -> vmm_api::Mac {
    let mut mac = [0u8; 6];
    let _ = super::rng::fill_random(&mut mac);
    vmm_api::Mac::local(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_local_unicast() {
        let m = random_mac();
        assert_eq!(m.0[0] & 0x03, 0x02);
    }

    #[test]
    fn rarp_announces_the_mac() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(&mac);
        let (hdr, e) = f.split_at(VNET_HDR_LEN);
        assert!(hdr.iter().all(|b| *b == 0));
        assert_eq!(e.len(), 60);
        assert_eq!(&e[..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3]);
        assert_eq!(&e[22..28], &mac);
        assert_eq!(&e[32..38], &mac);
    }
}
