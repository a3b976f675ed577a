//! virtio-balloon: the VMM sets a target size, the guest gives pages back (inflate) or takes them
//! again (deflate), and reports memory statistics on the stats queue: when asked (`balloon-stats`)
//! and, with a polling interval, on its own every interval (as QEMU's
//! `guest-stats-polling-interval`), so the latest figures are at hand without a round trip.
//!
//! Inflated pages are returned to the host (`memory::discard`).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::worker::{QueueHandler, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    INT_USED_RING, TYPE_BALLOON,
};
use crate::devices::lock;
use crate::memory::{GuestMemory, SharedMemory};
use vm_memory::GuestAddressSpace;

const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
const QUEUE_SIZE: u16 = 128;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
/// Balloon pages are always 4 KiB, whatever the guest's page size.
pub const BALLOON_PAGE: u64 = 4096;

const STAT_NAMES: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// The balloon's size in a snapshot: what the VMM asked for and what the driver said it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct BalloonState {
    pub target_pages: u32,
    pub actual_pages: u32,
}

/// The guest's last statistics report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BalloonStats {
    /// Reports received so far.
    pub reports: u64,
    pub values: BTreeMap<String, u64>,
    #[serde(skip)]
    pub received: Option<Instant>,
}

/// Shared between the device, its worker and the VMM's API.
#[derive(Default)]
pub struct BalloonControl {
    /// Target size of the balloon in 4 KiB pages (config `num_pages`).
    target: AtomicU32,
    /// What the driver says it holds (config `actual`).
    actual: AtomicU32,
    stats: Mutex<BalloonStats>,
    stats_changed: Condvar,
    /// Asks the worker to return the held stats buffer, so the driver sends a fresh report.
    poke: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl BalloonControl {
    pub fn set_target_pages(&self, pages: u32) {
        self.target.store(pages, Ordering::SeqCst);
    }
    pub fn target_pages(&self) -> u32 {
        self.target.load(Ordering::SeqCst)
    }
    pub fn actual_pages(&self) -> u32 {
        self.actual.load(Ordering::SeqCst)
    }

    /// The share of its memory the guest uses (total minus available, from its latest report),
    /// if a report younger than `max_age` has both figures.
    pub fn used_pct(&self, max_age: Duration) -> Option<f64> {
        let s = lock(&self.stats);
        if s.received?.elapsed() > max_age {
            return None;
        }
        let total = *s.values.get("total_memory")?;
        let available = *s.values.get("available_memory")?;
        (total > 0).then(|| total.saturating_sub(available) as f64 * 100.0 / total as f64)
    }

    /// Requests a fresh report and waits up to `timeout` for it; returns the newest stats.
    pub fn refresh_stats(&self, timeout: Duration) -> BalloonStats {
        let before = lock(&self.stats).reports;
        if let Some(poke) = lock(&self.poke).as_ref() {
            poke();
        }
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.stats);
        while s.reports == before {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .stats_changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.clone()
    }
}

pub struct Balloon {
    control: Arc<BalloonControl>,
    deflate_on_oom: bool,
    /// How often the guest is asked for statistics on the VMM's own initiative (none: only when
    /// the API asks).
    stats_interval: Option<Duration>,
    worker: Option<Worker<BalloonQueues>>,
}

impl Balloon {
    fn handler(&mut self, ctx: &mut ActivateContext) -> Result<BalloonQueues, ActivateError> {
        let stats_on = ctx.acked_features & VIRTIO_BALLOON_F_STATS_VQ != 0;
        let stats = ctx.queues.pop().filter(|_| stats_on);
        let deflate = ctx.queues.remove(DEFLATE);
        let inflate = ctx.queues.remove(INFLATE);
        let timer = match (self.stats_interval, &stats) {
            (Some(every), Some(_)) => {
                let mut t = TimerFd::new().map_err(|e| ActivateError::Worker(e.into()))?;
                t.reset(every, Some(every))
                    .map_err(|e| ActivateError::Worker(e.into()))?;
                Some(t)
            }
            _ => None,
        };
        Ok(BalloonQueues {
            mem: ctx.mem.clone(),
            inflate,
            deflate,
            stats,
            held_stats: None,
            interrupt: ctx.interrupt.clone(),
            control: self.control.clone(),
            timer,
        })
    }

    pub fn new(
        deflate_on_oom: bool,
        stats_interval: Option<Duration>,
    ) -> (Balloon, Arc<BalloonControl>) {
        let control = Arc::new(BalloonControl::default());
        (
            Balloon {
                control: control.clone(),
                deflate_on_oom,
                stats_interval,
                worker: None,
            },
            control,
        )
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let oom = if self.deflate_on_oom {
            VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        } else {
            0
        };
        VIRTIO_BALLOON_F_STATS_VQ | oom
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&self.control.target_pages().to_le_bytes());
        c[4..].copy_from_slice(&self.control.actual_pages().to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.control.actual.store(v, Ordering::SeqCst);
        } else {
            tracing::debug!(offset, ?data, "virtio-balloon: ignored config write");
        }
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = self.handler(&mut ctx)?;
        let worker = Worker::spawn("virtio-balloon", ctx.queue_evts, handler)
            .map_err(ActivateError::Worker)?;
        let poker = worker.poker().map_err(ActivateError::Worker)?;
        *lock(&self.control.poke) = Some(Box::new(poker));
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        *lock(&self.control.poke) = None;
        // Dropping the worker stops and joins its thread.
        self.worker = None;
        self.control.actual.store(0, Ordering::SeqCst);
    }
    fn name(&self) -> &'static str {
        "virtio-balloon"
    }
    fn save_state(&self) -> DeviceState {
        DeviceState::Balloon(BalloonState {
            target_pages: self.control.target_pages(),
            actual_pages: self.control.actual_pages(),
        })
    }
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        let DeviceState::Balloon(s) = state else {
            return Err(format!("virtio-balloon cannot take {state:?}"));
        };
        self.control.set_target_pages(s.target_pages);
        self.control.actual.store(s.actual_pages, Ordering::SeqCst);
        Ok(())
    }
    worker_access!();
}

pub struct BalloonQueues {
    mem: SharedMemory,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    /// The stats buffer the driver last filled; returned to ask for the next report.
    held_stats: Option<u16>,
    interrupt: Arc<Interrupt>,
    control: Arc<BalloonControl>,
    /// Fires every stats interval: the held stats buffer goes back for a fresh report.
    timer: Option<TimerFd>,
}

impl BalloonQueues {
    /// Reads the PFNs in `chain` and gives those pages back to the host (inflate) or just accepts
    /// them (deflate: the pages return on the guest's next touch).
    fn pages(&self, chain: DescriptorChain<&GuestMemory>, give_back: bool) {
        let guard = self.mem.memory();
        let mem: &GuestMemory = &guard;
        let Ok(mut r) = chain.reader(mem) else {
            tracing::debug!("virtio-balloon: chain outside guest memory");
            return;
        };
        let mut pfn = [0u8; 4];
        while r.read_exact(&mut pfn).is_ok() {
            if !give_back {
                continue;
            }
            let addr = GuestAddress(u64::from(u32::from_le_bytes(pfn)) * BALLOON_PAGE);
            if let Err(e) = crate::memory::discard(mem, addr, BALLOON_PAGE as usize) {
                tracing::debug!(pfn = u32::from_le_bytes(pfn), error = %e, "virtio-balloon: page not given back");
            }
        }
    }

    fn drain(&mut self, index: usize) {
        let mem = self.mem.memory();
        let give_back = index == INFLATE;
        let mut used = false;
        loop {
            let q = if give_back {
                &mut self.inflate
            } else {
                &mut self.deflate
            };
            let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            self.pages(chain, give_back);
            let q = if give_back {
                &mut self.inflate
            } else {
                &mut self.deflate
            };
            if let Err(e) = q.add_used(&*mem, head, 0) {
                tracing::warn!(error = ?e, "virtio-balloon: cannot return a buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }

    fn take_stats(&mut self) {
        let mem = self.mem.memory();
        let Some(q) = self.stats.as_mut() else { return };
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let mut values = BTreeMap::new();
            if let Ok(mut r) = chain.reader(&*mem) {
                let mut entry = [0u8; 10];
                while r.read_exact(&mut entry).is_ok() {
                    let tag = u16::from_le_bytes([entry[0], entry[1]]) as usize;
                    let val = u64::from_le_bytes(entry[2..10].try_into().unwrap_or([0; 8]));
                    if let Some(name) = STAT_NAMES.get(tag) {
                        values.insert((*name).to_string(), val);
                    }
                }
            }
            // A previous buffer still held would be a driver bug; give it back first.
            if let Some(old) = self.held_stats.replace(head) {
                let _ = q.add_used(&*mem, old, 0);
            }
            let mut s = lock(&self.control.stats);
            s.reports += 1;
            s.values = values;
            s.received = Some(Instant::now());
            self.control.stats_changed.notify_all();
        }
    }

    /// Returns the held stats buffer: the driver answers with a new report.
    fn request_stats(&mut self) {
        let mem = self.mem.memory();
        if let (Some(q), Some(head)) = (self.stats.as_mut(), self.held_stats.take()) {
            if q.add_used(&*mem, head, 0).is_ok() {
                self.interrupt.signal(INT_USED_RING);
            }
        }
    }
}

impl QueueHandler for BalloonQueues {
    fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, EventSet)> {
        use std::os::fd::AsRawFd;
        self.timer
            .iter()
            .map(|t| (t.as_raw_fd(), EventSet::IN))
            .collect()
    }
    fn backend_event(&mut self, _index: usize, _events: EventSet) {
        if let Some(t) = self.timer.as_mut() {
            let _ = t.wait();
        }
        self.request_stats();
    }
    fn queues(&self) -> Vec<(usize, &Queue)> {
        let mut q = vec![(INFLATE, &self.inflate), (DEFLATE, &self.deflate)];
        q.extend(self.stats.as_ref().map(|s| (STATS, s)));
        q
    }
    fn pausing(&mut self) {
        // The held stats buffer goes back now, so no buffer is owned outside the rings; the driver
        // refills it when the guest runs again.
        self.request_stats();
    }
    fn queue_event(&mut self, index: usize) {
        match index {
            INFLATE | DEFLATE => self.drain(index),
            STATS => self.take_stats(),
            _ => {}
        }
    }
    fn control_event(&mut self) {
        self.request_stats();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_pct_comes_from_a_recent_report_with_both_figures() {
        let c = BalloonControl::default();
        assert_eq!(c.used_pct(Duration::from_secs(5)), None);
        {
            let mut s = lock(&c.stats);
            s.values.insert("total_memory".into(), 1000);
            s.values.insert("available_memory".into(), 250);
            s.received = Some(Instant::now());
        }
        assert_eq!(c.used_pct(Duration::from_secs(5)), Some(75.0));
        // Too old.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.used_pct(Duration::from_millis(10)), None);
        // A report without the available figure says nothing.
        lock(&c.stats).values.remove("available_memory");
        assert_eq!(c.used_pct(Duration::from_secs(5)), None);
    }
}
