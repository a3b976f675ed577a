//! virtio-blk's queue handling as a driver drives it: the input is the guest's memory (the
//! descriptor table, available ring and buffers: any chain shape, any addresses, lengths and
//! flags) and the queue size it programs; the device's handler processes a kick. Whatever the
//! guest wrote: requests complete or fail with a status, the VMM never panics or touches memory
//! outside the guest's.
#![no_main]
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::BlockQueue;
use vmm::devices::virtio::worker::QueueHandler;
use vmm::devices::virtio::Interrupt;
use vmm::memory::{create_guest_memory, GuestMemory, Layout, SharedMemory};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 1 << 16;
// The rings low in memory, so that short inputs reach them: the available ring first (at most
// 518 bytes; not at 0, which virtio-queue takes for "not set"), the descriptor table (at most
// 4 KiB), the used ring; buffers anywhere.
const AVAIL: u64 = 0x40;
const DESC: u64 = 0x300;
const USED: u64 = 0x1300;

struct Fixture {
    mem: GuestMemory,
    disk: std::fs::File,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (mem, _) = create_guest_memory(Layout::fixed(MEM)).expect("guest memory");
        // A 64 KiB disk in memory.
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is not owned elsewhere.
        let disk = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        disk.set_len(64 * 1024).expect("disk size");
        Fixture { mem, disk }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&size_sel, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    // The guest's memory: the input, then zeros.
    let n = rest.len().min(MEM as usize);
    let mut image = vec![0u8; MEM as usize];
    image[..n].copy_from_slice(&rest[..n]);
    f.mem
        .write_slice(&image, GuestAddress(0))
        .expect("guest write");
    let size = 1u16 << (size_sel % 9); // 1 to 256, as the driver may program
    let mut q = Queue::new(256).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    let disk = f.disk.try_clone().expect("dup");
    let mut h = BlockQueue::detached(
        SharedMemory::new(f.mem.clone()),
        q,
        irq,
        disk,
        size_sel & 0x80 != 0,
    )
    .expect("handler");
    h.queue_event(0);
});
