//! The queue handling of virtio-rng, -balloon, -mem, -net and -vsock as a driver drives it. The
//! input picks the device, the features the driver accepts, the queue size and a sequence of
//! kicks (and, for net, a frame arriving from the tap); the rest is the guest's memory: rings,
//! descriptors and buffers, any shape. Whatever the guest wrote, the VMM never panics or touches
//! memory outside the guest's.
#![no_main]
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::balloon::Balloon;
use vmm::devices::virtio::mem::{Mem, MemControl, BLOCK_SIZE};
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::rng::Rng;
use vmm::devices::virtio::tap::Tap;
use vmm::devices::virtio::vsock::Vsock;
use vmm::devices::virtio::{ActivateContext, VirtioDevice};
use vmm::memory::{GuestMemory, SharedMemory};
use vmm_sys_util::epoll::EventSet;

#[path = "guest.rs"]
mod guest;

struct Fixture {
    mem: GuestMemory,
    devices: Vec<Mutex<Box<dyn VirtioDevice>>>,
    mem_control: std::sync::Arc<MemControl>,
    /// The far end of net's "tap": frames the guest sends arrive here, frames written here
    /// arrive at the guest.
    wire: Mutex<UnixDatagram>,
}

const NET: usize = 3;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (mem, layout) = guest::memory();
        let (balloon, _) = Balloon::new(true, None);
        let (virtio_mem, mem_control) = Mem::new(layout.hotplug_start(), guest::HOTPLUG);
        let (tap_end, wire) = UnixDatagram::pair().expect("socketpair");
        tap_end.set_nonblocking(true).expect("nonblocking");
        wire.set_nonblocking(true).expect("nonblocking");
        let tap = Tap::from_file(std::fs::File::from(std::os::fd::OwnedFd::from(tap_end)), "fuzz");
        let dir = std::env::temp_dir().join(format!("fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("vsock dir");
        let vsock = Vsock::new(3, &dir.join("v.sock")).expect("vsock");
        // Bound, it needs no name any more.
        let _ = std::fs::remove_dir_all(&dir);
        let devices: Vec<Box<dyn VirtioDevice>> = vec![
            Box::new(Rng::default()),
            Box::new(balloon),
            Box::new(virtio_mem),
            Box::new(Net::new(tap, [2, 0, 0, 0, 0, 1])),
            Box::new(vsock),
        ];
        Fixture {
            mem,
            devices: devices.into_iter().map(Mutex::new).collect(),
            mem_control,
            wire: Mutex::new(wire),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let [device, features, size_sel, kicks, ref rest @ ..] = *data else {
        return;
    };
    let f = fixture();
    guest::fill(&f.mem, rest);
    let which = usize::from(device) % f.devices.len();
    let mut dev = f.devices[which].lock().expect("device");
    let n = dev.queue_max_sizes().len();
    // Each feature the device offers is accepted or not by one bit of `features`.
    let acked = dev.features() & (u64::from(features) * 0x0101_0101_0101_0101);
    f.mem_control
        .set_requested_size(u64::from(device >> 6) * BLOCK_SIZE);
    let ctx = ActivateContext {
        mem: SharedMemory::new(f.mem.clone()),
        queues: (0..n).map(|i| guest::queue(i, size_sel)).collect(),
        queue_evts: Vec::new(),
        interrupt: guest::interrupt(),
        acked_features: acked,
    };
    // A driver error the device refuses at activation (virtio-mem without its feature).
    let Ok(mut h) = dev.detached(ctx) else {
        return;
    };
    if which == NET {
        // A frame from the network: the input's first bytes behind their length.
        let len = rest.first().map_or(0, |b| usize::from(*b)).min(rest.len());
        let _ = f.wire.lock().expect("wire").send(&rest[..len]);
        h.backend_event(0, EventSet::IN);
    }
    for k in 0..4 {
        h.queue_event(usize::from(kicks >> (2 * k)) % n);
    }
    if which == NET {
        // What the guest sent, so the next input starts from an empty wire.
        let mut buf = [0u8; 65536];
        let wire = f.wire.lock().expect("wire");
        while wire.recv(&mut buf).is_ok() {}
    }
});
