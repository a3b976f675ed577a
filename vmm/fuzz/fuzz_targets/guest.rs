//! What the virtio fuzz targets share: a small guest whose memory is the input, and queues
//! programmed as a driver would (any size from 1 to 256), with their rings low in memory so that
//! short inputs reach them.
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::Interrupt;
use vmm::memory::{create_guest_memory, GuestMemory, Layout};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM the input fills.
pub const MEM: u64 = 1 << 16;
/// A virtio-mem region above it (only address space until plugged).
pub const HOTPLUG: u64 = 8 << 20;
/// Queue `i`'s rings start at `i * QUEUE_STRIDE`: the available ring first (at most 518 bytes; not
/// at 0, which virtio-queue takes for "not set"), the descriptor table (at most 4 KiB), the used
/// ring; buffers anywhere.
const QUEUE_STRIDE: u64 = 0x2000;
const AVAIL: u64 = 0x40;
const DESC: u64 = 0x300;
const USED: u64 = 0x1300;

pub fn memory() -> (GuestMemory, Layout) {
    let layout = Layout {
        boot: MEM,
        hotplug: HOTPLUG,
    };
    let (mem, _) = create_guest_memory(layout).expect("guest memory");
    (mem, layout)
}

/// Writes `data` (then zeros) over the guest's RAM.
pub fn fill(mem: &GuestMemory, data: &[u8]) {
    let n = data.len().min(MEM as usize);
    let mut image = vec![0u8; MEM as usize];
    image[..n].copy_from_slice(&data[..n]);
    mem.write_slice(&image, GuestAddress(0))
        .expect("guest write");
}

/// Queue `index` as the driver set it up, `1 << (size_sel % 9)` entries.
pub fn queue(index: usize, size_sel: u8) -> Queue {
    let base = index as u64 * QUEUE_STRIDE;
    let mut q = Queue::new(256).expect("queue");
    q.set_size(1u16 << (size_sel % 9));
    q.set_desc_table_address(Some((base + DESC) as u32), Some(0));
    q.set_avail_ring_address(Some((base + AVAIL) as u32), Some(0));
    q.set_used_ring_address(Some((base + USED) as u32), Some(0));
    q.set_ready(true);
    q
}

pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ))
}
