//! Virtio devices driven through their real transport and worker thread, as a driver would.
//!
//! Fuzzing: random descriptor tables, rings and queue programming fed to every device. A buggy or
//! malicious driver must never crash or hang the VMM: after every round the device must still
//! answer a well-formed request. Bounded: a fixed number of rounds per device from a fixed seed
//! (override with VIRTIO_FUZZ_ROUNDS / VIRTIO_FUZZ_SEED).
//!
//! State: a paused device's saved state restored into a fresh device continues where it stopped.

mod common;
use common::blank_disk;

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::balloon::Balloon;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::mmio::{
    reg, MmioTransport, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::rng::Rng;
use vmm::devices::virtio::tap::Tap;
use vmm::devices::virtio::vsock::Vsock;
use vmm::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm::devices::BusDevice;
use vmm::memory::{create_guest_memory, GuestMemory};
use vmm::migration::Snapshottable;
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const DATA: u64 = 0x10000;

/// xorshift64*: deterministic and dependency-free.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

fn rounds() -> u64 {
    std::env::var("VIRTIO_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn seed() -> u64 {
    std::env::var("VIRTIO_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe_f00d_0001)
}

struct Harness {
    t: MmioTransport,
    mem: GuestMemory,
    queues: usize,
}

impl Harness {
    fn new(dev: Box<dyn VirtioDevice>) -> Harness {
        let (mem, _f) = create_guest_memory(vmm::memory::Layout::fixed(MEM)).unwrap();
        Harness::with_memory(dev, mem)
    }

    /// A second device on the same guest memory: what a restored VM's device sees.
    fn with_memory(dev: Box<dyn VirtioDevice>, mem: GuestMemory) -> Harness {
        let queues = dev.queue_max_sizes().len();
        let evts = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Harness {
            t: MmioTransport::new(
                "virtio0".into(),
                dev,
                vmm::memory::SharedMemory::new(mem.clone()),
                irq,
                evts,
            ),
            mem,
            queues,
        }
    }

    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Negotiates, programs every queue (queue q's rings at DESC/AVAIL/USED + q * 0x10000 would
    /// overlap the data area, so only queue `target` gets the shared rings; the rest point at their
    /// own small rings) and sets DRIVER_OK. Returns the status read back.
    fn setup(&mut self, rng: &mut Rand, target: usize, bad_size: bool) -> u32 {
        self.w(reg::STATUS, 0);
        self.w(reg::STATUS, 1);
        self.w(reg::STATUS, 3);
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(reg::DEVICE_FEATURES);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(
            reg::DRIVER_FEATURES,
            if rng.chance(10) {
                rng.next() as u32
            } else {
                lo
            },
        );
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
        self.w(reg::STATUS, 3 | STATUS_FEATURES_OK);
        for q in 0..self.queues {
            self.w(reg::QUEUE_SEL, q as u32);
            let max = self.r(reg::QUEUE_NUM_MAX);
            let size = if bad_size && q == target {
                1 + rng.below(u64::from(max) + 40) as u32
            } else {
                max
            };
            self.w(reg::QUEUE_NUM, size);
            let base = if q == target {
                0
            } else {
                0x8_0000 + q as u64 * 0x2000
            };
            self.w(reg::QUEUE_DESC_LOW, (base + DESC) as u32);
            self.w(reg::QUEUE_DESC_HIGH, 0);
            self.w(reg::QUEUE_AVAIL_LOW, (base + AVAIL) as u32);
            self.w(reg::QUEUE_AVAIL_HIGH, 0);
            self.w(reg::QUEUE_USED_LOW, (base + USED) as u32);
            self.w(reg::QUEUE_USED_HIGH, 0);
            self.w(reg::QUEUE_READY, 1);
        }
        let s = self.r(reg::STATUS);
        self.w(reg::STATUS, s | STATUS_DRIVER_OK);
        self.r(reg::STATUS)
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Posts `head` as avail entry `n` (0-based) of the queue at the shared rings and kicks `q`;
    /// waits up to 5 s for used idx to reach `n + 1`. False if it did not.
    fn post(&mut self, q: usize, n: u16, head: u16) -> bool {
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 256)))
            .unwrap();
        self.mem
            .write_obj(n.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(reg::QUEUE_NOTIFY, q as u32);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx() != n.wrapping_add(1) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Writes `n` random descriptors and an avail ring naming random heads; kicks queue `q`.
    fn random_round(&mut self, rng: &mut Rand, q: usize, size: u16) {
        for i in 0..size as u64 {
            let addr = match rng.below(4) {
                0 => rng.below(2 * MEM),
                1 => MEM - rng.below(64),
                _ => DATA + rng.below(MEM - DATA - 0x1000),
            };
            let len = if rng.chance(10) {
                rng.next() as u32
            } else {
                rng.below(0x2000) as u32
            };
            let flags = rng.below(8) as u16;
            let next = if rng.chance(80) {
                rng.below(u64::from(size))
            } else {
                rng.below(1 << 16)
            } as u16;
            let d = DESC + i * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        let n = 1 + rng.below(u64::from(size).min(16)) as u16;
        for i in 0..n as u64 {
            let head = if rng.chance(90) {
                rng.below(u64::from(size))
            } else {
                rng.below(1 << 16)
            } as u16;
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + 2 * i))
                .unwrap();
        }
        // Sometimes claim more entries than were written, even more than the queue holds.
        let idx = if rng.chance(10) {
            rng.below(1 << 16) as u16
        } else {
            n
        };
        self.mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
        self.w(reg::QUEUE_NOTIFY, q as u32);
        // Let the worker get through what it can; it must not need long.
        let deadline = Instant::now() + Duration::from_millis(20);
        while self.used_idx() != idx && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A well-formed request on queue `q` (built by `req`) must complete within 5 s.
    fn must_answer(&mut self, rng: &mut Rand, q: usize, req: &dyn Fn(&GuestMemory) -> u16) {
        let st = self.setup(rng, q, false);
        assert_eq!(
            st & STATUS_NEEDS_RESET,
            0,
            "clean setup flagged NEEDS_RESET"
        );
        let head = req(&self.mem);
        self.mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
        self.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        self.w(reg::QUEUE_NOTIFY, q as u32);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx() != 1 {
            assert!(
                Instant::now() < deadline,
                "device stopped answering after the fuzz rounds"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn desc(mem: &GuestMemory, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let d = DESC + i * 16;
    mem.write_obj(addr, GuestAddress(d)).unwrap();
    mem.write_obj(len, GuestAddress(d + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
    mem.write_obj(next, GuestAddress(d + 14)).unwrap();
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn fuzz(name: &str, dev: Box<dyn VirtioDevice>, valid: (usize, &dyn Fn(&GuestMemory) -> u16)) {
    let mut rng = Rand(seed() ^ name.len() as u64);
    let mut h = Harness::new(dev);
    let mut needs_reset_seen = false;
    for round in 0..rounds() {
        let q = rng.below(h.queues as u64) as usize;
        let bad_size = rng.chance(10);
        let status = h.setup(&mut rng, q, bad_size);
        if status & STATUS_NEEDS_RESET != 0 {
            needs_reset_seen = true;
            continue;
        }
        assert_ne!(
            status & STATUS_DRIVER_OK,
            0,
            "{name} round {round}: device not live"
        );
        h.w(reg::QUEUE_SEL, q as u32);
        let size = h.r(reg::QUEUE_NUM_MAX) as u16;
        h.random_round(&mut rng, q, size);
        // Garbage into the config space and unknown registers too.
        h.t.write(
            reg::CONFIG + rng.below(64),
            &rng.next().to_le_bytes()[..1 + rng.below(8) as usize],
        );
        h.w(rng.below(0x100) & !3, rng.next() as u32);
    }
    assert!(
        needs_reset_seen || rounds() < 50,
        "{name}: bad queue sizes never flagged NEEDS_RESET"
    );
    h.must_answer(&mut rng, valid.0, valid.1);
    h.w(reg::STATUS, 0);
}

#[test]
fn block_survives_random_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fuzz.img");
    blank_disk(&img);
    let dev = Block::open(&img, false).unwrap();
    // A GET_ID request: header, 20-byte id buffer, status byte.
    let req = |mem: &GuestMemory| {
        mem.write_obj(8u32, GuestAddress(DATA)).unwrap();
        mem.write_obj(0u64, GuestAddress(DATA + 8)).unwrap();
        desc(mem, 0, DATA, 16, NEXT, 1);
        desc(mem, 1, DATA + 0x100, 20, NEXT | WRITE, 2);
        desc(mem, 2, DATA + 0x200, 1, WRITE, 0);
        0
    };
    fuzz("block", Box::new(dev), (0, &req));
}

#[test]
fn rng_survives_random_descriptors() {
    let req = |mem: &GuestMemory| {
        desc(mem, 0, DATA, 64, WRITE, 0);
        0
    };
    fuzz("rng", Box::new(Rng::default()), (0, &req));
}

#[test]
fn balloon_survives_random_descriptors() {
    let (dev, _control) = Balloon::new(true, None);
    // Deflate one PFN.
    let req = |mem: &GuestMemory| {
        mem.write_obj(0x20u32, GuestAddress(DATA)).unwrap();
        desc(mem, 0, DATA, 4, 0, 0);
        0
    };
    fuzz("balloon", Box::new(dev), (1, &req));
}

#[test]
fn vsock_survives_random_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
    // A REQUEST to a host port nobody listens on: answered with a reset (tx buffer used).
    let req = |mem: &GuestMemory| {
        let h = vmm::devices::virtio::vsock::Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 4444,
            type_: 1,
            op: 1,
            buf_alloc: 4096,
            ..Default::default()
        };
        mem.write_slice(&h.to_bytes(), GuestAddress(DATA)).unwrap();
        desc(mem, 0, DATA, 44, 0, 0);
        0
    };
    fuzz("vsock", Box::new(dev), (1, &req));
}

#[test]
fn net_survives_random_descriptors() {
    // Needs CAP_NET_ADMIN for the tap (CI runs as root). The tap is not persistent: it disappears
    // with this process, and it is never brought up, so nothing leaves it.
    let tap = Tap::open(&format!("vfz{}", std::process::id() % 100_000))
        .expect("cannot create a tap (run as root)");
    let dev = Net::new(tap, [0x02, 0, 0, 0, 0, 1]);
    // Transmit one minimal frame: 12-byte header + 60-byte frame.
    let req = |mem: &GuestMemory| {
        desc(mem, 0, DATA, 72, 0, 0);
        0
    };
    fuzz("net", Box::new(dev), (1, &req));
}

/// rng: used ring positions survive save → restore into a fresh device, the restored device is
/// quiet until resumed, saving it again gives the same state, and it then continues counting.
#[test]
fn rng_state_restores_into_a_fresh_device() {
    let mut rng = Rand(1);
    let mut h = Harness::new(Box::new(Rng::default()));
    h.setup(&mut rng, 0, false);
    desc(&h.mem, 0, DATA, 64, WRITE, 0);
    assert!(h.post(0, 0, 0), "first request not answered");
    assert!(h.post(0, 1, 0), "second request not answered");
    h.t.pause().unwrap();
    let saved = h.t.snapshot().unwrap();
    let state = h.t.save().unwrap();
    assert_eq!(state.queues[0].next_avail, 2);
    assert_eq!(state.queues[0].next_used, 2);
    assert_ne!(state.status & STATUS_DRIVER_OK, 0);

    // A request posted while the old device is paused is not served by it.
    h.mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 4)).unwrap();
    h.mem.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.used_idx(), 2, "a paused device processed a request");

    let mut r = Harness::with_memory(Box::new(Rng::default()), h.mem.clone());
    drop(h);
    r.t.restore_snapshot(saved.clone()).unwrap();
    assert_eq!(r.r(reg::STATUS), state.status);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.used_idx(), 2, "restored device ran before resume");
    assert_eq!(r.t.save().unwrap(), state, "state changed across restore");
    r.t.resume().unwrap();
    // The pending request is picked up on resume, then new ones follow.
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.used_idx() != 3 {
        assert!(
            Instant::now() < deadline,
            "pending request not served after resume"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(r.post(0, 3, 0), "request after restore not answered");
}

#[test]
fn restore_refuses_another_device_type() {
    let mut rng = Rand(2);
    let mut h = Harness::new(Box::new(Rng::default()));
    h.setup(&mut rng, 0, false);
    h.t.pause().unwrap();
    let saved = h.t.snapshot().unwrap();
    let (balloon, _c) = Balloon::new(false, None);
    let mut other = Harness::with_memory(Box::new(balloon), h.mem.clone());
    let err = other
        .t
        .restore_snapshot(saved.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("device type"), "{err}");
    assert_eq!(
        other.r(reg::STATUS),
        0,
        "a refused restore changed the device"
    );
}

/// blk: releasing lets another VMM lock the image; taking it back fails (and flags NEEDS_RESET)
/// while that one holds it, and works once it is gone; the device then serves requests again.
#[test]
fn block_releases_and_reacquires_its_lock() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    blank_disk(&img);
    let mut rng = Rand(3);
    let mut h = Harness::new(Box::new(Block::open(&img, false).unwrap()));
    h.setup(&mut rng, 0, false);
    // GET_ID.
    h.mem.write_obj(8u32, GuestAddress(DATA)).unwrap();
    h.mem.write_obj(0u64, GuestAddress(DATA + 8)).unwrap();
    desc(&h.mem, 0, DATA, 16, NEXT, 1);
    desc(&h.mem, 1, DATA + 0x100, 20, NEXT | WRITE, 2);
    desc(&h.mem, 2, DATA + 0x200, 1, WRITE, 0);
    vmm::memory::take_vmm_dirty(&h.mem);
    assert!(h.post(0, 0, 0));
    // The id and status were written straight into guest memory; migration must see that page.
    let page = (DATA / 4096) as usize;
    assert_ne!(
        vmm::memory::take_vmm_dirty(&h.mem)[0][page / 64] & (1 << (page % 64)),
        0,
        "device write not tracked dirty"
    );
    assert!(
        Block::open(&img, false).is_err(),
        "a second VMM could open a locked disk"
    );
    h.t.pause().unwrap();
    let saved = h.t.snapshot().unwrap();
    h.t.release();
    let target = Block::open(&img, false).expect("the released lock is still held");
    let err = h.t.reacquire(&saved.0).unwrap_err();
    assert!(err.contains("in use"), "{err}");
    assert_ne!(h.r(reg::STATUS) & STATUS_NEEDS_RESET, 0);
    drop(target);
    // Once the other VMM is gone, taking it back works and the device continues.
    h.t.reacquire(&saved.0).unwrap();
    assert!(h.post(0, 1, 0), "device idle after taking its disk back");
    assert!(Block::open(&img, false).is_err(), "lock not taken back");
}

/// vsock: a restored device tells the driver its connections are gone (TRANSPORT_RESET on the
/// event queue) as soon as the driver offers an event buffer.
#[test]
fn vsock_sends_transport_reset_after_restore() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("v.sock");
    let mut rng = Rand(4);
    let mut h = Harness::new(Box::new(Vsock::new(3, &sock).unwrap()));
    h.setup(&mut rng, 2, false);
    h.t.pause().unwrap();
    let saved = h.t.snapshot().unwrap();
    h.t.release();
    assert!(!sock.exists(), "released vsock socket still there");
    let mut r = Harness::with_memory(Box::new(Vsock::new(3, &sock).unwrap()), h.mem.clone());
    drop(h);
    r.t.restore_snapshot(saved.clone()).unwrap();
    r.t.resume().unwrap();
    r.mem.write_obj(0xffff_ffffu32, GuestAddress(DATA)).unwrap();
    desc(&r.mem, 0, DATA, 8, WRITE, 0);
    assert!(r.post(2, 0, 0), "no event delivered");
    let event: u32 = r.mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(event, 0, "not VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
}
