//! virtio-blk's queue handling as a driver drives it: the input is the guest's memory (the
//! descriptor table, available ring and buffers: any chain shape, any addresses, lengths and
//! flags) and the queue size it programs; the device's handler processes a kick. Whatever the
//! guest wrote: requests complete or fail with a status, the VMM never panics or touches memory
//! outside the guest's.
#![no_main]
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::{ActivateContext, VirtioDevice};
use vmm::memory::{GuestMemory, SharedMemory};

#[path = "guest.rs"]
mod guest;

struct Fixture {
    mem: GuestMemory,
    /// A 64 KiB disk, read-write and read-only.
    disks: [Mutex<Block>; 2],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (mem, _) = guest::memory();
        let path = std::env::temp_dir().join(format!("fuzz-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 * 1024]).expect("disk");
        let rw = Block::open(&path, false).expect("disk rw");
        let copy = path.with_extension("ro");
        std::fs::copy(&path, &copy).expect("disk copy");
        let ro = Block::open(&copy, true).expect("disk ro");
        // Open, they need no name any more.
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&copy);
        Fixture {
            mem,
            disks: [Mutex::new(rw), Mutex::new(ro)],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&size_sel, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    guest::fill(&f.mem, rest);
    let mut disk = f.disks[usize::from(size_sel >> 7)].lock().expect("disk");
    let ctx = ActivateContext {
        mem: SharedMemory::new(f.mem.clone()),
        queues: vec![guest::queue(0, size_sel)],
        queue_evts: Vec::new(),
        interrupt: guest::interrupt(),
        acked_features: disk.features(),
    };
    let mut h = disk.detached(ctx).expect("handler");
    h.queue_event(0);
});
