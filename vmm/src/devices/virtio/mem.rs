//! virtio-mem: a region of guest physical memory above boot RAM that the guest takes in 2 MiB
//! blocks. The VMM sets `requested_size` (`resize --memory-mib`); the driver plugs or unplugs
//! blocks until `plugged_size` matches, one request at a time on its single queue. Unplugged
//! blocks are discarded (`memory::discard`): the host gets the memory back and the guest must not
//! touch them again until it plugs them (`VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`, which the driver
//! has to accept).
//!
//! The device keeps which blocks are plugged; snapshots and migrations carry that bitmap and the
//! requested size, so a resized VM keeps its size wherever it is restored.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::worker::{QueueHandler, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    INT_USED_RING, TYPE_MEM,
};
use crate::devices::lock;
use crate::memory::{GuestMemory, SharedMemory};

/// The unit the guest plugs and unplugs.
pub const BLOCK_SIZE: u64 = 2 << 20;
/// The region is a whole number of Linux's x86 memory blocks (128 MiB), so all of it is usable.
pub const REGION_ALIGN: u64 = 128 << 20;
/// The guest must not read or write unplugged memory.
const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 128;

/// Request types (`struct virtio_mem_req`).
const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
/// Response types.
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;
/// `state` answers.
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
/// type, 3 padding words, then addr (u64), nb_blocks (u16), 3 padding words.
const REQ_LEN: usize = 24;
/// type, 3 padding words, then the state (u16).
const RESP_LEN: usize = 10;

/// What a snapshot keeps: the size asked for and which blocks the guest holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemState {
    pub requested_size: u64,
    /// Bit `i` of word `i / 64`: block `i` is plugged.
    pub plugged: Vec<u64>,
}

/// The blocks' state and the size asked for, shared by the device, its worker and the VMM.
pub struct MemControl {
    /// Guest physical start of the region.
    addr: u64,
    region_size: u64,
    inner: Mutex<Blocks>,
}

struct Blocks {
    requested: u64,
    plugged: Vec<bool>,
}

impl Blocks {
    fn plugged_size(&self) -> u64 {
        self.plugged.iter().filter(|p| **p).count() as u64 * BLOCK_SIZE
    }
}

impl MemControl {
    pub fn region(&self) -> (u64, u64) {
        (self.addr, self.region_size)
    }
    pub fn requested_size(&self) -> u64 {
        lock(&self.inner).requested
    }
    /// What the guest holds now.
    pub fn plugged_size(&self) -> u64 {
        lock(&self.inner).plugged_size()
    }
    /// Sets the size the guest should hold; the caller tells the driver (config change).
    pub fn set_requested_size(&self, bytes: u64) {
        lock(&self.inner).requested = bytes;
    }

    /// Checks a request's range: block aligned, at least one block, inside the region. Returns
    /// the first block's index and the count.
    fn blocks(&self, addr: u64, nb_blocks: u16) -> Option<(usize, usize)> {
        let n = usize::from(nb_blocks);
        let off = addr.checked_sub(self.addr)?;
        let len = u64::from(nb_blocks) * BLOCK_SIZE;
        (n > 0 && off % BLOCK_SIZE == 0 && off.checked_add(len)? <= self.region_size)
            .then_some(((off / BLOCK_SIZE) as usize, n))
    }

    /// Handles one request; returns the response type and the state word.
    fn handle(&self, mem: &GuestMemory, req: Request) -> (u16, u16) {
        let mut b = lock(&self.inner);
        match req.kind {
            REQ_PLUG | REQ_UNPLUG => {
                let plug = req.kind == REQ_PLUG;
                let Some((first, n)) = self.blocks(req.addr, req.nb_blocks) else {
                    return (RESP_ERROR, 0);
                };
                let range = first..first + n;
                // Plugging what is plugged, or unplugging what is not, is a driver error.
                if b.plugged[range.clone()].contains(&plug) {
                    return (RESP_ERROR, 0);
                }
                let len = n as u64 * BLOCK_SIZE;
                if plug && b.plugged_size() + len > b.requested {
                    return (RESP_NACK, 0);
                }
                if !plug {
                    let addr = GuestAddress(self.addr + first as u64 * BLOCK_SIZE);
                    if let Err(e) = crate::memory::discard(mem, addr, len as usize) {
                        tracing::error!(error = %e, "virtio-mem: cannot give unplugged memory back");
                        return (RESP_ERROR, 0);
                    }
                }
                b.plugged[range].iter_mut().for_each(|p| *p = plug);
                (RESP_ACK, 0)
            }
            REQ_UNPLUG_ALL => {
                // Each plugged run at once: few madvise calls for a mostly plugged region.
                let mut i = 0;
                while i < b.plugged.len() {
                    if !b.plugged[i] {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < b.plugged.len() && b.plugged[i] {
                        i += 1;
                    }
                    let addr = GuestAddress(self.addr + start as u64 * BLOCK_SIZE);
                    let len = ((i - start) as u64 * BLOCK_SIZE) as usize;
                    if let Err(e) = crate::memory::discard(mem, addr, len) {
                        tracing::error!(error = %e, "virtio-mem: cannot give unplugged memory back");
                        return (RESP_ERROR, 0);
                    }
                    b.plugged[start..i].iter_mut().for_each(|p| *p = false);
                }
                (RESP_ACK, 0)
            }
            REQ_STATE => {
                let Some((first, n)) = self.blocks(req.addr, req.nb_blocks) else {
                    return (RESP_ERROR, 0);
                };
                let s = &b.plugged[first..first + n];
                let state = if s.iter().all(|p| *p) {
                    STATE_PLUGGED
                } else if s.iter().all(|p| !*p) {
                    STATE_UNPLUGGED
                } else {
                    STATE_MIXED
                };
                (RESP_ACK, state)
            }
            _ => (RESP_ERROR, 0),
        }
    }
}

#[derive(Clone, Copy)]
struct Request {
    kind: u16,
    addr: u64,
    nb_blocks: u16,
}

impl Request {
    fn parse(b: &[u8; REQ_LEN]) -> Request {
        Request {
            kind: u16::from_le_bytes([b[0], b[1]]),
            addr: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        }
    }
}

pub struct Mem {
    control: Arc<MemControl>,
    worker: Option<Worker<MemQueue>>,
}

impl Mem {
    fn handler(&mut self, ctx: &mut ActivateContext) -> Result<MemQueue, ActivateError> {
        Ok(MemQueue {
            mem: ctx.mem.clone(),
            queue: ctx.queues.remove(0),
            interrupt: ctx.interrupt.clone(),
            control: self.control.clone(),
        })
    }

    /// A device for the region at guest address `addr`, `region_size` bytes (a multiple of
    /// [`BLOCK_SIZE`]), nothing plugged.
    pub fn new(addr: u64, region_size: u64) -> (Mem, Arc<MemControl>) {
        let control = Arc::new(MemControl {
            addr,
            region_size,
            inner: Mutex::new(Blocks {
                requested: 0,
                plugged: vec![false; (region_size / BLOCK_SIZE) as usize],
            }),
        });
        (
            Mem {
                control: control.clone(),
                worker: None,
            },
            control,
        )
    }
}

impl VirtioDevice for Mem {
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let b = lock(&self.control.inner);
        // struct virtio_mem_config: block_size, node_id + padding, addr, region_size,
        // usable_region_size, plugged_size, requested_size.
        let mut c = [0u8; 56];
        c[0..8].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        c[16..24].copy_from_slice(&self.control.addr.to_le_bytes());
        c[24..32].copy_from_slice(&self.control.region_size.to_le_bytes());
        c[32..40].copy_from_slice(&self.control.region_size.to_le_bytes());
        c[40..48].copy_from_slice(&b.plugged_size().to_le_bytes());
        c[48..56].copy_from_slice(&b.requested.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.acked_features & VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE == 0 {
            return Err(ActivateError::Device(
                "the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE".into(),
            ));
        }
        let handler = self.handler(&mut ctx)?;
        self.worker = Some(
            Worker::spawn("virtio-mem", ctx.queue_evts, handler).map_err(ActivateError::Worker)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        // Plugged blocks stay plugged: a driver that starts again asks for their state or
        // unplugs them all.
        self.worker = None;
    }
    fn name(&self) -> &'static str {
        "virtio-mem"
    }
    fn save_state(&self) -> DeviceState {
        let b = lock(&self.control.inner);
        let mut words = vec![0u64; b.plugged.len().div_ceil(64)];
        for (i, _) in b.plugged.iter().enumerate().filter(|(_, p)| **p) {
            words[i / 64] |= 1 << (i % 64);
        }
        DeviceState::Mem(MemState {
            requested_size: b.requested,
            plugged: words,
        })
    }
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        let DeviceState::Mem(s) = state else {
            return Err(format!("virtio-mem cannot take {state:?}"));
        };
        let mut b = lock(&self.control.inner);
        let blocks = b.plugged.len();
        if s.plugged.len() != blocks.div_ceil(64) {
            return Err(format!(
                "virtio-mem: the snapshot's bitmap has {} words; a region of {blocks} blocks needs {}",
                s.plugged.len(),
                blocks.div_ceil(64)
            ));
        }
        if s.requested_size > self.control.region_size || s.requested_size % BLOCK_SIZE != 0 {
            return Err(format!(
                "virtio-mem: requested size {} does not fit the {}-byte region in blocks",
                s.requested_size, self.control.region_size
            ));
        }
        let bit = |i: usize| s.plugged[i / 64] & (1 << (i % 64)) != 0;
        if let Some(i) = (blocks..s.plugged.len() * 64).find(|i| bit(*i)) {
            return Err(format!("virtio-mem: block {i} is past the region's end"));
        }
        b.requested = s.requested_size;
        for (i, p) in b.plugged.iter_mut().enumerate() {
            *p = bit(i);
        }
        Ok(())
    }
    worker_access!();
}

pub struct MemQueue {
    mem: SharedMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    control: Arc<MemControl>,
}

impl MemQueue {
    /// Reads the request from the chain's readable part and writes the response to its
    /// writable part; returns the bytes written, or `None` for a malformed chain.
    fn serve(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Option<u32> {
        let mut req = [0u8; REQ_LEN];
        let mut reader = chain.clone().reader(mem).ok()?;
        std::io::Read::read_exact(&mut reader, &mut req).ok()?;
        let r = Request::parse(&req);
        let (kind, state) = self.control.handle(mem, r);
        tracing::debug!(
            request = r.kind,
            addr = r.addr,
            blocks = r.nb_blocks,
            response = kind,
            "virtio-mem request"
        );
        let mut resp = [0u8; RESP_LEN];
        resp[0..2].copy_from_slice(&kind.to_le_bytes());
        resp[8..10].copy_from_slice(&state.to_le_bytes());
        let out = chain.writable().next()?;
        if (out.len() as usize) < RESP_LEN {
            return None;
        }
        mem.write_slice(&resp, out.addr()).ok()?;
        Some(RESP_LEN as u32)
    }
}

impl QueueHandler for MemQueue {
    fn queues(&self) -> Vec<(usize, &Queue)> {
        vec![(0, &self.queue)]
    }
    fn queue_event(&mut self, _index: usize) {
        let guard = self.mem.memory();
        let mem: &GuestMemory = &guard;
        let mut used = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.serve(mem, chain).unwrap_or_else(|| {
                tracing::debug!("virtio-mem: malformed request chain");
                0
            });
            if let Err(e) = self.queue.add_used(mem, head, len) {
                tracing::warn!(error = ?e, "virtio-mem: cannot return a buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, Layout};

    const ADDR: u64 = 16 << 20;

    fn setup() -> (GuestMemory, Mem, Arc<MemControl>) {
        let (mem, _f) = create_guest_memory(Layout::fixed(32 << 20)).unwrap();
        let (dev, control) = Mem::new(ADDR, 16 << 20);
        (mem, dev, control)
    }

    fn req(kind: u16, addr: u64, nb_blocks: u16) -> Request {
        Request {
            kind,
            addr,
            nb_blocks,
        }
    }

    #[test]
    fn plugs_up_to_the_requested_size_and_unplugs() {
        let (mem, _dev, c) = setup();
        assert_eq!(c.handle(&mem, req(REQ_PLUG, ADDR, 1)), (RESP_NACK, 0));
        c.set_requested_size(4 << 20);
        assert_eq!(c.handle(&mem, req(REQ_PLUG, ADDR, 2)), (RESP_ACK, 0));
        assert_eq!(c.plugged_size(), 4 << 20);
        // Over the requested size.
        assert_eq!(
            c.handle(&mem, req(REQ_PLUG, ADDR + (4 << 20), 1)),
            (RESP_NACK, 0)
        );
        // Plugged twice.
        c.set_requested_size(8 << 20);
        assert_eq!(c.handle(&mem, req(REQ_PLUG, ADDR, 1)), (RESP_ERROR, 0));
        assert_eq!(
            c.handle(&mem, req(REQ_STATE, ADDR, 4)),
            (RESP_ACK, STATE_MIXED)
        );
        assert_eq!(
            c.handle(&mem, req(REQ_STATE, ADDR, 2)),
            (RESP_ACK, STATE_PLUGGED)
        );
        mem.write_obj(0x55u8, GuestAddress(ADDR + 4096)).unwrap();
        assert_eq!(
            c.handle(&mem, req(REQ_UNPLUG, ADDR + BLOCK_SIZE, 1)),
            (RESP_ACK, 0)
        );
        // Unplugging what is not plugged.
        assert_eq!(
            c.handle(&mem, req(REQ_UNPLUG, ADDR + BLOCK_SIZE, 1)),
            (RESP_ERROR, 0)
        );
        assert_eq!(c.handle(&mem, req(REQ_UNPLUG_ALL, 0, 0)), (RESP_ACK, 0));
        assert_eq!(c.plugged_size(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ADDR + 4096)).unwrap(), 0);
    }

    #[test]
    fn refuses_ranges_outside_the_region_or_not_on_blocks() {
        let (mem, _dev, c) = setup();
        c.set_requested_size(16 << 20);
        for r in [
            req(REQ_PLUG, ADDR - BLOCK_SIZE, 1),
            req(REQ_PLUG, ADDR + 4096, 1),
            req(REQ_PLUG, ADDR, 0),
            req(REQ_PLUG, ADDR, 9),
            req(REQ_PLUG, u64::MAX - 10, 1),
            req(REQ_STATE, ADDR + (16 << 20), 1),
            req(9, ADDR, 1),
        ] {
            assert_eq!(c.handle(&mem, r).0, RESP_ERROR);
        }
        assert_eq!(c.plugged_size(), 0);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let (mem, dev, c) = setup();
        c.set_requested_size(6 << 20);
        c.handle(&mem, req(REQ_PLUG, ADDR + BLOCK_SIZE, 3));
        let saved = dev.save_state();
        let (_, mut other, oc) = setup();
        other.restore_state(saved.clone()).unwrap();
        assert_eq!(oc.plugged_size(), 6 << 20);
        assert_eq!(oc.requested_size(), 6 << 20);
        assert_eq!(other.save_state(), saved);
        let bad = |requested_size, plugged| {
            DeviceState::Mem(MemState {
                requested_size,
                plugged,
            })
        };
        assert!(other.restore_state(bad(0, vec![0, 0])).is_err());
        assert!(other.restore_state(bad(0, vec![1 << 8])).is_err());
        assert!(other.restore_state(bad(3 << 20, vec![0])).is_err());
        assert!(other.restore_state(bad(1 << 40, vec![0])).is_err());
        assert!(other.restore_state(DeviceState::None).is_err());
    }
}
