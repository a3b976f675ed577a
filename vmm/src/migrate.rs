//! Live migration over shared storage (docs/migration.md).
//!
//! Source: dirty-page logging on, all of guest RAM copied into `DIR/memory.bin`, then rounds that
//! copy only the pages dirtied since the last round, while the guest runs. When the rest fits in the
//! downtime limit (or the round limit is hit) the vCPUs pause, the last pages and the complete state
//! are written, and `DIR/state.bin` appears (atomic rename): that is the handover.
//!
//! Target (`vmm run --incoming DIR`): waits for `state.bin`, claims the VM by creating `DIR/claimed`
//! exclusively, restores (memory mapped lazily from `memory.bin`) and writes `DIR/resumed` with the
//! time it resumed. If the target has not claimed within the handover timeout, the source claims
//! instead and resumes the guest itself: whoever creates `claimed` first runs the guest, so it never
//! runs in two places. A target that claimed but cannot start the VM (a disk it cannot lock, a tap
//! it cannot open) writes why to `DIR/failed` and gives up its claim, and the source takes over.
//!
//! Devices pause with the vCPUs and let go of their host resources (disk locks, taps, vsock
//! sockets) before `state.bin` appears; the source takes them back if the guest returns to it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::api::{MigrationOutcome, MigrationPhase, MigrationProgress, MigrationStatus, RunState};
use crate::config::VmConfig;
use crate::persist::Components;
use crate::snapshot::{self, SnapshotState};
use crate::vm::Vm;

pub use crate::api::WATCHING_FILE;
pub use vmm_api::{
    MIGRATION_CLAIM_FILE as CLAIM_FILE, MIGRATION_FAILED_FILE as FAILED_FILE,
    MIGRATION_RESUMED_FILE as RESUMED_FILE,
};
/// How long a source waits, before it pauses the guest, for a target to say it is watching: a
/// target that still looks only every 20 ms would add that to the downtime. One that started
/// late, or is gone, is not waited for longer.
const WATCHING_WAIT: Duration = Duration::from_millis(100);
/// What a previous migration through the same directory may have left, removed by the source in
/// this order (`await_handover` relies on `state.bin` going first). `memory.bin` is unlinked, never
/// truncated: a VM that came in through this directory still maps it privately.
const STALE: [&str; 6] = [
    snapshot::STATE_FILE,
    CLAIM_FILE,
    RESUMED_FILE,
    FAILED_FILE,
    snapshot::MEMORY_FILE,
    // After memory.bin: a target writes it only while memory.bin is there.
    WATCHING_FILE,
];
const PAGE: u64 = 4096;
/// Where a handover the source took back leaves its state file.
const ABORTED_STATE_FILE: &str = "state.bin.aborted";

/// Removes a migration's files once it has failed or been cancelled with the guest running on
/// this side (no target holds a claim): nothing is left on the shared storage, a full disk
/// included. `state.bin` goes first, so no target can claim from here on.
fn retire(dir: &Path) {
    for f in STALE.iter().chain([&ABORTED_STATE_FILE]) {
        match std::fs::remove_file(dir.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(file = f, error = %e, "cannot remove a migration file");
            }
            _ => {}
        }
    }
}

/// What `migrate` was asked for.
#[derive(Debug, Clone)]
pub struct Params {
    pub dir: PathBuf,
    pub downtime: Duration,
    pub max_rounds: u32,
    pub handover_timeout: Duration,
}

/// A handover the target claimed but had not finished when the outcome was reported.
pub struct Claimed {
    dir: PathBuf,
    state: SnapshotState,
}

/// How a [`Claimed`] handover ended.
#[derive(Debug)]
pub enum Late {
    /// The target resumed the guest: this side is done.
    Resumed,
    /// The target gave the guest back; it runs here again (the message says what went wrong).
    TakenBack(String),
}

/// Pauses the guest or lets it run, through the VMM's control loop (which alone changes the run
/// state); waits until it has.
pub type RunControl = Box<dyn Fn(RunState) -> Result<(), String> + Send>;

/// What the source side works with; the main loop keeps answering the API meanwhile.
pub struct Source {
    /// Memory and dirty logging (through `vm`), and the state to hand over; the devices let go of
    /// their host resources at the handover and take them back on failure.
    pub parts: Components,
    pub config: VmConfig,
    pub run: RunControl,
    pub progress: Arc<Mutex<MigrationProgress>>,
    pub cancel: Arc<AtomicBool>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Creates `DIR/claimed` if nobody has; true if we got it.
pub fn claim(dir: &Path, who: &str) -> std::io::Result<bool> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(CLAIM_FILE))
    {
        Ok(mut f) => {
            writeln!(f, "{who} {}", std::process::id())?;
            f.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Milliseconds from `paused_ns` to the time the target wrote in `DIR/resumed`, once it has.
fn downtime_if_resumed(dir: &Path, paused_ns: u128) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join(RESUMED_FILE)).ok()?;
    let resumed: u128 = text.trim().parse().unwrap_or(paused_ns);
    Some(resumed.saturating_sub(paused_ns) as f64 / 1e6)
}

/// Writes the pages set in `bitmaps` from guest memory into `out`; returns the bytes written.
fn write_dirty(vm: &Vm, bitmaps: &[(u64, u64, Vec<u64>)], out: &File) -> std::io::Result<u64> {
    use vm_memory::{Bytes, GuestAddress};
    let ram = vm.ram();
    let mut page = vec![0u8; PAGE as usize];
    let mut written = 0;
    for (gpa, file_off, bitmap) in bitmaps {
        for (word_i, word) in bitmap.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let page_i = word_i as u64 * 64 + bit;
                ram.read_slice(&mut page, GuestAddress(gpa + page_i * PAGE))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                out.write_all_at(&page, file_off + page_i * PAGE)?;
                written += PAGE;
            }
        }
    }
    Ok(written)
}

fn dirty_bytes(bitmaps: &[(u64, u64, Vec<u64>)]) -> u64 {
    bitmaps
        .iter()
        .flat_map(|(_, _, b)| b.iter())
        .map(|w| u64::from(w.count_ones()) * PAGE)
        .sum()
}

impl Source {
    fn set(&self, f: impl FnOnce(&mut MigrationProgress)) {
        f(&mut crate::devices::lock(&self.progress));
    }

    /// Runs the whole migration. On anything but success the guest keeps (or goes back to)
    /// running here, with dirty logging off — except when the target claimed the VM and went
    /// silent: then the guest stays paused and the [`Claimed`] handover is returned, to
    /// [`Source::watch`].
    pub fn run(&self, p: &Params) -> (MigrationOutcome, Option<Box<Claimed>>) {
        let t0 = Instant::now();
        let mut rounds = 0;
        let mut written = 0;
        let result = self.migrate(p, &mut rounds, &mut written);
        let _ = self.parts.vm.set_dirty_logging(false);
        let outcome = |status, downtime_ms, error| MigrationOutcome {
            status,
            downtime_ms,
            total_ms: t0.elapsed().as_secs_f64() * 1000.0,
            rounds,
            bytes_written: written,
            error,
            waiting_for_target: false,
        };
        match result {
            Ok(Some(downtime_ms)) => (
                outcome(MigrationStatus::Completed, Some(downtime_ms), None),
                None,
            ),
            Ok(None) => {
                self.resume_here();
                retire(&p.dir);
                (outcome(MigrationStatus::Cancelled, None, None), None)
            }
            Err(e) => {
                if e.resume {
                    self.resume_here();
                }
                if e.claimed.is_none() {
                    retire(&p.dir);
                }
                let mut o = outcome(MigrationStatus::Failed, None, Some(e.message));
                o.waiting_for_target = e.claimed.is_some();
                (o, e.claimed)
            }
        }
    }

    /// After a handover the target claimed but did not finish in time: stays paused until the
    /// target resumes the guest (a slow target, not a dead one) or gives it back. Never resumes
    /// the guest while the claim is the target's.
    pub fn watch(&self, claimed: Box<Claimed>) -> Late {
        loop {
            if claimed.dir.join(RESUMED_FILE).exists() {
                return Late::Resumed;
            }
            if let Some(failure) = self.take_back_given_up(&claimed.dir, &claimed.state) {
                self.resume_here();
                retire(&claimed.dir);
                return Late::TakenBack(failure.message);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The guest runs here again (through the control loop, which logs what failed to).
    fn resume_here(&self) {
        if let Err(e) = (self.run)(RunState::Running) {
            tracing::error!(error = %e, "the guest did not fully resume after the migration stopped");
        }
    }

    /// `Ok(Some(downtime))` when the target runs the guest, `Ok(None)` when cancelled.
    fn migrate(
        &self,
        p: &Params,
        rounds: &mut u32,
        written: &mut u64,
    ) -> Result<Option<f64>, Failure> {
        let dir = &p.dir;
        std::fs::create_dir_all(dir)
            .map_err(Failure::io("cannot create the migration directory"))?;
        for stale in STALE {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let mem_path = dir.join(snapshot::MEMORY_FILE);
        // A new file (the old one was unlinked above): fails rather than write into an old one.
        let out = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&mem_path)
            .map_err(Failure::io("cannot create memory.bin"))?;
        out.set_len(self.config.memory_bytes())
            .map_err(Failure::io("cannot size memory.bin"))?;

        // Round 0: everything, with logging already on so nothing written meanwhile is missed.
        self.parts
            .vm
            .set_dirty_logging(true)
            .map_err(|e| Failure::new(format!("cannot enable dirty logging: {e}")))?;
        self.set(|pr| pr.phase = MigrationPhase::CopyingMemory);
        *written += snapshot::copy_memory(&self.parts.vm.ram(), &self.parts.vm.backing, &out)
            .map_err(Failure::io("cannot copy memory"))?;
        let mut last = Instant::now();
        let mut bandwidth: f64 = 0.0;
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let bitmaps = self
                .parts
                .vm
                .dirty_bitmaps()
                .map_err(|e| Failure::new(format!("dirty log: {e}")))?;
            let remaining = dirty_bytes(&bitmaps);
            let rate = remaining as f64 / last.elapsed().as_secs_f64().max(1e-6);
            last = Instant::now();
            *rounds += 1;
            self.set(|pr| {
                pr.phase = MigrationPhase::PreCopy;
                pr.round = *rounds;
                pr.remaining_bytes = remaining;
                pr.dirty_rate_mib_s = rate / f64::from(1 << 20);
                pr.bytes_written = *written;
            });
            let fits =
                bandwidth > 0.0 && (remaining as f64 / bandwidth) <= p.downtime.as_secs_f64();
            if fits || *rounds >= p.max_rounds {
                // Make what is already written durable now, so the pause only waits for the rest.
                out.sync_data()
                    .map_err(Failure::io("cannot flush memory.bin"))?;
                return self.handover(p, &out, &bitmaps, written);
            }
            let t = Instant::now();
            *written += write_dirty(&self.parts.vm, &bitmaps, &out)
                .map_err(Failure::io("cannot write dirty pages"))?;
            if remaining > 0 {
                bandwidth = remaining as f64 / t.elapsed().as_secs_f64().max(1e-6);
            } else if bandwidth == 0.0 {
                bandwidth = f64::MAX;
            }
        }
    }

    /// Pauses, writes the rest and the state, and waits for the target to take over.
    /// `Ok(None)`: cancelled before the target claimed the VM, which then runs here again.
    fn handover(
        &self,
        p: &Params,
        out: &File,
        pending: &[(u64, u64, Vec<u64>)],
        written: &mut u64,
    ) -> Result<Option<f64>, Failure> {
        let deadline = Instant::now() + WATCHING_WAIT;
        while !p.dir.join(WATCHING_FILE).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let paused_ns = now_ns();
        // vCPUs, then devices (no new requests), before the last dirty log is read (what the
        // devices wrote is in it). A pause that fails leaves everything running.
        (self.run)(RunState::Paused).map_err(|e| Failure::new(format!("cannot pause: {e}")))?;
        self.set(|pr| pr.phase = MigrationPhase::Handover);
        let last = self
            .parts
            .vm
            .dirty_bitmaps()
            .map_err(|e| Failure::new(format!("dirty log: {e}")))?;
        *written += write_dirty(&self.parts.vm, pending, out)
            .map_err(Failure::io("cannot write dirty pages"))?;
        *written += write_dirty(&self.parts.vm, &last, out)
            .map_err(Failure::io("cannot write dirty pages"))?;
        out.sync_data()
            .map_err(Failure::io("cannot flush memory.bin"))?;
        let state = self
            .parts
            .save(&self.config)
            .map_err(|e| Failure::new(e.to_string()))?;
        // From here the target may open the disks, taps and sockets.
        self.parts.virtio.release();
        if let Err(e) = snapshot::write_state(&p.dir, &state) {
            return Err(self.take_back(&p.dir, &state, e.to_string()));
        }

        // The target claims and resumes; if it does not claim in time, we claim and resume here.
        let deadline = Instant::now() + p.handover_timeout;
        loop {
            if let Some(downtime) = downtime_if_resumed(&p.dir, paused_ns) {
                return Ok(Some(downtime));
            }
            let cancelled = self.cancel.load(Ordering::SeqCst);
            if cancelled && claim(&p.dir, "source").unwrap_or(false) {
                let failure = self.take_back(&p.dir, &state, String::new());
                if failure.message.is_empty() {
                    return Ok(None);
                }
                return Err(failure);
            }
            if let Some(failure) = self.take_back_given_up(&p.dir, &state) {
                return Err(failure);
            }
            if Instant::now() >= deadline {
                return match claim(&p.dir, "source") {
                    Ok(true) => Err(self.take_back(
                        &p.dir,
                        &state,
                        format!(
                            "the target did not take over within {:?}; the guest runs here again",
                            p.handover_timeout
                        ),
                    )),
                    // The target claimed but has not resumed: it owns the guest now, so this side
                    // must not run it. Wait for it a while longer, then report and stay paused.
                    Ok(false) => self
                        .wait_resumed(&p.dir, paused_ns, p.handover_timeout, state)
                        .map(Some),
                    Err(e) => Err(Failure::paused(format!(
                        "cannot claim the VM back: {e}; staying paused"
                    ))),
                };
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The guest runs here again (we hold the claim): the handover state is retired and the
    /// devices take their resources back. Returns the failure to report, with any device that could
    /// not be taken back named (an empty message for a clean cancel).
    fn take_back(&self, dir: &Path, state: &SnapshotState, why: String) -> Failure {
        let _ = std::fs::rename(dir.join(snapshot::STATE_FILE), dir.join(ABORTED_STATE_FILE));
        // Each device finds its own state by id among all of them.
        let errors = self.parts.virtio.reacquire(&state.devices.virtio);
        let mut message = why;
        if !errors.is_empty() {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!(
                "devices not taken back (they need a reset): {}",
                errors.join(", ")
            ));
        }
        Failure::new(message)
    }

    /// If the target gave up its claim (`failed`), claims the VM and takes it back: whoever claims
    /// after that runs the guest. The failure to report, once the guest is ours again.
    fn take_back_given_up(&self, dir: &Path, state: &SnapshotState) -> Option<Failure> {
        let why = std::fs::read_to_string(dir.join(FAILED_FILE)).ok()?;
        if !claim(dir, "source").unwrap_or(false) {
            return None;
        }
        Some(self.take_back(
            dir,
            state,
            format!(
                "the target could not start the VM ({}); the guest runs here again",
                why.trim()
            ),
        ))
    }

    fn wait_resumed(
        &self,
        dir: &Path,
        paused_ns: u128,
        timeout: Duration,
        state: SnapshotState,
    ) -> Result<f64, Failure> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(downtime) = downtime_if_resumed(dir, paused_ns) {
                return Ok(downtime);
            }
            if let Some(failure) = self.take_back_given_up(dir, &state) {
                return Err(failure);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(Failure {
            message: "the target claimed the VM but has not resumed it; the guest stays paused here (it must not run twice) until the target resumes it or gives it back".into(),
            resume: false,
            claimed: Some(Box::new(Claimed {
                dir: dir.to_path_buf(),
                state,
            })),
        })
    }
}

/// Why a migration failed, and whether the guest should run here again.
struct Failure {
    message: String,
    resume: bool,
    /// The target holds the claim: watch for how it ends.
    claimed: Option<Box<Claimed>>,
}

impl Failure {
    /// The guest runs here again.
    fn new(message: String) -> Failure {
        Failure {
            message,
            resume: true,
            claimed: None,
        }
    }
    /// The target owns the guest (or may): this side must not run it.
    fn paused(message: String) -> Failure {
        Failure {
            message,
            resume: false,
            claimed: None,
        }
    }
    fn io(what: &'static str) -> impl Fn(std::io::Error) -> Failure {
        move |e| Failure::new(format!("{what}: {e}"))
    }
}

/// Target side: waits for the handover in `dir`, then claims the VM. Returns false if the source
/// took it back first.
///
/// A handover is a `state.bin` that nobody has claimed and no target gave up. The target removes
/// nothing: a target that starts late would otherwise delete the handover it was waiting for.
/// Files left by an earlier migration (`state.bin` with `claimed`, or `failed`) are waited out; the
/// next source removes them in `STALE` order, `state.bin` first, so once `claimed` and `failed`
/// are gone a `state.bin` seen afterwards is the new one.
///
/// Gives up with `TimedOut` after `wait`. Polls (shared storage such as NFS sends no change
/// notifications): slowly until the source has started copying memory, then every 200 µs, since
/// this wait is part of the guest's downtime.
pub fn await_handover(dir: &Path, wait: Duration) -> std::io::Result<bool> {
    let r = wait_for_handover(dir, wait);
    if !matches!(r, Ok(true)) {
        // This target will not run the guest: its sign that it watches goes with it.
        let _ = std::fs::remove_file(dir.join(WATCHING_FILE));
    }
    r
}

fn wait_for_handover(dir: &Path, wait: Duration) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let deadline = Instant::now() + wait;
    loop {
        let open = !dir.join(CLAIM_FILE).exists() && !dir.join(FAILED_FILE).exists();
        if open && dir.join(snapshot::STATE_FILE).exists() && readable(dir) {
            return claim(dir, "target");
        }
        if Instant::now() >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no VM was handed over in {} within {} ms",
                    dir.display(),
                    wait.as_millis()
                ),
            ));
        }
        let copying = open && dir.join(snapshot::MEMORY_FILE).exists();
        if copying && !dir.join(WATCHING_FILE).exists() {
            // Tells the source this target looks often now (it waits for that before pausing).
            let _ = std::fs::File::create(dir.join(WATCHING_FILE));
        }
        std::thread::sleep(if copying {
            Duration::from_micros(200)
        } else {
            Duration::from_millis(20)
        });
    }
}

/// Whether this target can read the handover. A source VMM of the release before the jail runs
/// as root and writes it 0600; the target's agent gives the files to this VMM's user as they
/// appear (agent `vms::adopt_handover`), and until it has, the handover is not this target's
/// to claim yet (claiming it would only fail and give the guest back).
fn readable(dir: &Path) -> bool {
    [snapshot::STATE_FILE, snapshot::MEMORY_FILE]
        .iter()
        .all(|f| File::open(dir.join(f)).is_ok())
}

/// Target side, after claiming: the VM cannot start here. Says why and gives the claim up, so the
/// source takes the guest back at once instead of waiting for its timeout.
pub fn give_back(dir: &Path, why: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{FAILED_FILE}.tmp"));
    std::fs::write(&tmp, why)?;
    std::fs::rename(tmp, dir.join(FAILED_FILE))?;
    std::fs::remove_file(dir.join(CLAIM_FILE))
}

/// Target side: tells the source the guest runs here.
pub fn report_resumed(dir: &Path) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{RESUMED_FILE}.tmp"));
    std::fs::write(&tmp, now_ns().to_string())?;
    std::fs::rename(tmp, dir.join(RESUMED_FILE))
}
