//! The VMs of this host: each a `vmm` child process with an API socket. Their records live in the
//! state directory (`vms/ID.json`), so an agent that restarts re-adopts the VMMs still running
//! instead of losing them. Results of handled jobs are kept too (`jobs/ID.pb`): a redelivered
//! command is answered from there, never done twice. Each VM is owned by its supervisor task
//! (`supervisor.rs`); what is shared by all of them is in [`Dirs`].

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use vim_proto::{VmReport, VmSpec, VmState};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: SpecRecord,
    pub pid: u32,
    /// Running, stopped or failed.
    pub state: VmState,
    pub api_socket: PathBuf,
    pub console: PathBuf,
    /// A migration out of this host was asked of the VMM: an agent that restarts finds whether
    /// it completed (the VM moved) in the migration directory.
    #[serde(default)]
    pub outgoing: bool,
}

/// The serialisable copy of a `VmSpec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecRecord {
    pub vm_id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub disk: String,
    /// Empty: no NIC.
    #[serde(default)]
    pub mac: String,
    /// The most vCPUs it can be resized to while it runs (0: vcpus).
    #[serde(default)]
    pub max_vcpus: u32,
    /// The most memory it can be resized to while it runs (0: memory_mib).
    #[serde(default)]
    pub max_memory_mib: u64,
    /// What the agent watches to ask for a resize (none: nothing).
    #[serde(default)]
    pub scaling: Option<WatchRecord>,
    /// How often the agent checkpoints it (docs/checkpoint.md); 0: never.
    #[serde(default)]
    pub checkpoint_ms: u32,
}

/// The serialisable copy of a `ScalingWatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRecord {
    pub up_pct: u32,
    pub up_window_s: u32,
    pub down_pct: u32,
    pub down_window_s: u32,
    pub min_vcpus: u32,
}

impl From<&vim_proto::ScalingWatch> for WatchRecord {
    fn from(w: &vim_proto::ScalingWatch) -> Self {
        WatchRecord {
            up_pct: w.up_pct,
            up_window_s: w.up_window_s,
            down_pct: w.down_pct,
            down_window_s: w.down_window_s,
            min_vcpus: w.min_vcpus,
        }
    }
}

impl From<WatchRecord> for vim_proto::ScalingWatch {
    fn from(w: WatchRecord) -> Self {
        vim_proto::ScalingWatch {
            up_pct: w.up_pct,
            up_window_s: w.up_window_s,
            down_pct: w.down_pct,
            down_window_s: w.down_window_s,
            min_vcpus: w.min_vcpus,
        }
    }
}

/// A scaling watch that makes sense (a command is input like any other).
fn check_watch(w: &vim_proto::ScalingWatch) -> anyhow::Result<()> {
    anyhow::ensure!(
        w.down_pct < w.up_pct && w.up_pct <= 100,
        "scaling thresholds must be 0 <= down < up <= 100"
    );
    anyhow::ensure!(
        (1..=3600).contains(&w.up_window_s) && (1..=3600).contains(&w.down_window_s),
        "scaling windows must be 1 to 3600 s"
    );
    Ok(())
}

impl From<&VmSpec> for SpecRecord {
    fn from(s: &VmSpec) -> Self {
        SpecRecord {
            vm_id: s.vm_id.clone(),
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
            kernel: s.kernel.clone(),
            initrd: s.initrd.clone(),
            cmdline: s.cmdline.clone(),
            disk: s.disk.clone(),
            mac: s.mac.clone(),
            max_vcpus: s.max_vcpus,
            max_memory_mib: s.max_memory_mib,
            scaling: s.scaling.as_ref().map(WatchRecord::from),
            checkpoint_ms: s.checkpoint_ms,
        }
    }
}

/// The longest a migration may take, end to end (its outcome is waited for this long at most).
pub const MAX_MIGRATION_WAIT: Duration = Duration::from_secs(3600);

/// CPU accounting between reports.
#[derive(Default)]
struct CpuSample {
    ticks: u64,
    vcpu_ticks: u64,
    at: Option<Instant>,
    /// What the last long enough interval measured (vCPU %, VMM %).
    pct: (f64, f64),
}

/// The shortest interval CPU use is measured over. Ticks are 10 ms: a report sent right after
/// another (an answer to a command between two heartbeats) would otherwise read two ticks in
/// 11 ms as 180 % of a core, or a busy guest as idle.
const MIN_CPU_INTERVAL: Duration = Duration::from_millis(500);

/// Where the agent keeps things, and the checks every command passes: shared by all VMs.
#[derive(Debug)]
pub struct Dirs {
    pub state_dir: PathBuf,
    pub shared_dir: PathBuf,
    pub vmm: PathBuf,
    /// The bridge VMs' taps join.
    pub bridge: String,
    /// How VMMs are confined; None: they run as the agent's user, unconfined (`--no-jail`).
    pub jail: Option<crate::jail::Jail>,
}

/// One VM of this host: its record and, once started here, its `vmm` child. Owned by the VM's
/// supervisor task (`supervisor.rs`); every method blocks (processes, files, the VMM's socket),
/// so the supervisor calls them on a blocking thread.
pub struct Vm {
    dirs: Arc<Dirs>,
    pub record: VmRecord,
    child: Option<Child>,
    cpu: CpuSample,
}

/// A number for each VM report that only grows on this host: microseconds since the epoch when
/// the agent started, then one more each report, so a restarted agent goes on above it (vimd
/// applies a report only if it is newer than the last one it applied).
pub fn next_report_seq() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let start = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64)
    };
    if SEQ.load(Ordering::Relaxed) == 0 {
        let _ = SEQ.compare_exchange(0, start(), Ordering::SeqCst, Ordering::SeqCst);
    }
    SEQ.fetch_add(1, Ordering::SeqCst) + 1
}

/// A migration between this host's jailed VMM and one of a host still on the release before
/// the jail: that VMM runs as root with umask 077, so what it writes into the migration directory
/// for the other side is root's, 0600, and the jailed VMM cannot read it — the handover
/// (`memory.bin`, then `state.bin`) when this host is the target, `resumed` or `failed` when it
/// is the source. Gives each of `files` to the VMM user as it appears (the jailed VMM waits
/// until it can read them), every 2 ms while `go_on` says so. Files a jailed VMM wrote are the
/// VMM user's already: nothing to do then but look.
fn adopt_from_unjailed(
    jail: &crate::jail::Jail,
    dir: &Path,
    files: &[&str],
    mut go_on: impl FnMut() -> bool,
) {
    use std::os::unix::fs::MetadataExt;
    while go_on() {
        for f in files.iter().map(|f| dir.join(f)) {
            let Ok(meta) = std::fs::symlink_metadata(&f) else {
                continue;
            };
            if meta.uid() != jail.uid {
                match jail.own(&f) {
                    Ok(()) => tracing::info!(
                        file = %f.display(),
                        owner = meta.uid(),
                        "a migration file from an unjailed VMM given to the VMM user"
                    ),
                    Err(e) => {
                        tracing::warn!(file = %f.display(), error = %e, "cannot give a migration file to the VMM user")
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The target side of [`adopt_from_unjailed`]: until a claim made after it started (a claim an
/// earlier migration left goes before the next handover appears), the VMM's exit, or `wait`
/// (the VMM's own limit) and a second.
fn adopt_handover(dirs: &Dirs, dir: &Path, pid: u32, wait: Duration) {
    let Some(jail) = &dirs.jail else {
        return;
    };
    let deadline = Instant::now() + wait + Duration::from_secs(1);
    let claim = dir.join(vmm_api::MIGRATION_CLAIM_FILE);
    let mut unclaimed = false;
    let files = [vmm_api::SNAPSHOT_MEMORY_FILE, vmm_api::SNAPSHOT_STATE_FILE];
    adopt_from_unjailed(jail, dir, &files, || {
        let claimed = claim.exists();
        let claimed_now = claimed && unclaimed;
        unclaimed |= !claimed;
        !claimed_now && Instant::now() < deadline && alive(pid)
    });
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    if pid == 0 || unsafe { libc::kill(pid as i32, 0) } != 0 {
        return false;
    }
    // A VMM whose agent died is a child of init (or a subreaper) once it exits; until that
    // reaps it, it is a zombie: it has exited. But only once its last thread has: the main
    // thread of a killed VMM is a zombie while its vCPU threads still tear down its memory (tens
    // of ms for a GiB), and until the last one is gone its files, and so its disk's lock, are
    // held (a resume on this host right after a suspend found the disk locked).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    if !matches!(state, Some("Z" | "X")) {
        return true;
    }
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|t| t.count() > 1)
}

/// SIGKILLs `pid` if it is a live vmm process; whether it was.
pub fn kill_vmm(pid: u32) -> bool {
    if !is_live_vmm(pid) {
        return false;
    }
    // SAFETY: kill(2) on a pid checked just now to be a live vmm process.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) == 0 }
}

/// Whether `pid` is a live vmm process.
pub fn is_live_vmm(pid: u32) -> bool {
    pid != 0 && alive(pid) && is_vmm(pid)
}

/// Whether `pid` is a vmm process (a recycled pid is not adopted).
fn is_vmm(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"vmm"))
        })
        .unwrap_or(false)
}

impl Dirs {
    pub fn new(state_dir: &Path, shared_dir: &Path, vmm: &Path) -> anyhow::Result<Dirs> {
        for d in ["vms", "jobs", "deleted", "moved"] {
            std::fs::create_dir_all(state_dir.join(d))?;
        }
        Ok(Dirs {
            state_dir: state_dir.into(),
            shared_dir: shared_dir.into(),
            vmm: vmm.into(),
            bridge: "vimbr0".into(),
            jail: None,
        })
    }

    /// VM `id`'s directory on this host that its VMM may write: its API socket.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("run").join(id)
    }

    /// VM `id`'s VMM's API socket.
    pub fn api_socket(&self, id: &str) -> PathBuf {
        self.run_dir(id).join("api.sock")
    }

    /// VM `id`'s own directory on shared storage: its disk, its suspended state, its migration
    /// handovers; the only place its VMM may be asked to write state (`--state-root`).
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.shared_dir.join("vms").join(id)
    }

    /// Where VM `id`'s VMM writes its log (stderr).
    pub fn vmm_log(&self, id: &str) -> PathBuf {
        vmm_log_path(&self.state_dir, id)
    }

    /// Refuses a command this host must not carry out, whoever sent it: an id that is not of
    /// the one format (it becomes a path), a size out of range, or a file outside the shared
    /// image store (`SHARED/images/…`, or the VM's own `SHARED/vms/ID/…`) or not a regular
    /// file (so no command can hand a guest `/etc/shadow` or a device as its disk).
    pub fn check_command(&self, action: &vim_proto::host_command::Action) -> anyhow::Result<()> {
        use vim_proto::host_command::Action;
        vim_proto::check_id("VM id", action_vm(action))?;
        let s = match action {
            Action::Create(s) | Action::Resume(s) | Action::Standby(s) => s,
            Action::MigrateIn(m) => m.vm.as_ref().ok_or_else(|| anyhow::anyhow!("no VM"))?,
            Action::MigrateOut(m) => {
                anyhow::ensure!(
                    m.handover_timeout_ms <= MAX_MIGRATION_WAIT.as_millis() as u64,
                    "handover timeout too long"
                );
                return Ok(());
            }
            Action::Resize(r) => {
                anyhow::ensure!((1..=254).contains(&r.vcpus), "vcpus must be 1 to 254");
                anyhow::ensure!(
                    r.memory_mib == 0 || (16..=1 << 20).contains(&r.memory_mib),
                    "memory_mib must be 16 to 1048576"
                );
                return Ok(());
            }
            Action::SetScaling(s) => return s.scaling.as_ref().map_or(Ok(()), check_watch),
            Action::SetCheckpoints(s) => return check_checkpoint_ms(s.checkpoint_ms),
            _ => return Ok(()),
        };
        anyhow::ensure!((1..=254).contains(&s.vcpus), "vcpus must be 1 to 254");
        anyhow::ensure!(
            s.max_vcpus == 0 || (s.vcpus..=254).contains(&s.max_vcpus),
            "max_vcpus must be vcpus to 254"
        );
        if let Some(w) = &s.scaling {
            check_watch(w)?;
        }
        check_checkpoint_ms(s.checkpoint_ms)?;
        anyhow::ensure!(
            (16..=1 << 22).contains(&s.memory_mib),
            "memory_mib must be 16 to 4194304"
        );
        anyhow::ensure!(
            s.max_memory_mib == 0
                || ((s.memory_mib..=1 << 20).contains(&s.max_memory_mib)
                    && (s.max_memory_mib - s.memory_mib) % 2 == 0),
            "max_memory_mib must be memory_mib to 1048576, memory_mib plus whole 2 MiB blocks"
        );
        anyhow::ensure!(
            s.cmdline.len() <= 4096 && !s.cmdline.contains('\0'),
            "the kernel command line is too long or holds a NUL"
        );
        anyhow::ensure!(!s.kernel.is_empty(), "no kernel");
        if !s.mac.is_empty() {
            // It ends up in the VMM's `--net` argument: only a plain MAC may.
            let mac: vmm_api::Mac = s.mac.parse()?;
            anyhow::ensure!(mac.is_unicast(), "MAC {mac} is not unicast");
        }
        let roots = [self.shared_dir.join("images"), self.vm_dir(&s.vm_id)];
        for (what, path) in [
            ("kernel", &s.kernel),
            ("initrd", &s.initrd),
            ("disk", &s.disk),
        ] {
            if path.is_empty() {
                continue;
            }
            let real =
                std::fs::canonicalize(path).map_err(|e| anyhow::anyhow!("{what} {path}: {e}"))?;
            let inside = roots
                .iter()
                .any(|r| std::fs::canonicalize(r).is_ok_and(|r| real.starts_with(r)));
            anyhow::ensure!(inside, "{what} {path} is not in the shared image store");
            anyhow::ensure!(
                std::fs::metadata(&real)?.is_file(),
                "{what} {path} is not a regular file"
            );
        }
        Ok(())
    }

    fn tombstone(&self, id: &str) -> PathBuf {
        self.state_dir.join("deleted").join(id)
    }

    /// Whether VM `id` was deleted on this host (it is never created again).
    pub fn is_deleted(&self, id: &str) -> bool {
        self.tombstone(id).exists()
    }

    /// Marks VM `id` deleted, for good.
    pub fn mark_deleted(&self, id: &str) -> anyhow::Result<()> {
        std::fs::write(self.tombstone(id), b"")?;
        Ok(())
    }

    fn moved_marker(&self, id: &str) -> PathBuf {
        self.state_dir.join("moved").join(id)
    }

    /// Remembers that VM `id` moved to another host, with the migration's outcome: a
    /// `migrate_out` sent again (the agent died before it answered) is answered from it.
    pub fn mark_moved(&self, id: &str, outcome: &vmm_api::MigrationOutcome) -> anyhow::Result<()> {
        replace_file(&self.moved_marker(id), &serde_json::to_vec(outcome)?)
    }

    /// How VM `id` left this host, if it did (and has not come back since).
    pub fn moved(&self, id: &str) -> Option<vmm_api::MigrationOutcome> {
        let bytes = std::fs::read(self.moved_marker(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("vms").join(format!("{id}.json"))
    }

    /// Where VM `id` is handed over in a live migration: its own directory on shared storage,
    /// derived from the id on each host (no path travels in a command).
    pub fn migration_dir(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("migration")
    }

    /// Where VM `id`'s checkpoints go (docs/checkpoint.md): its own directory on shared storage,
    /// derived from the id on each host, so any host can resume it.
    pub fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("checkpoint")
    }

    /// Where VM `id`'s state goes when it is suspended: its own directory on shared storage,
    /// derived from the id on each host, so any host can resume it.
    pub fn suspend_dir(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("suspended")
    }

    // Handled jobs.

    pub fn job_result(&self, job_id: &str) -> Option<vim_proto::HostEvent> {
        let p = self.state_dir.join("jobs").join(format!("{job_id}.pb"));
        let bytes = std::fs::read(p).ok()?;
        prost::Message::decode(bytes.as_slice()).ok()
    }

    pub fn save_job_result(&self, job_id: &str, ev: &vim_proto::HostEvent) -> anyhow::Result<()> {
        replace_file(
            &self.state_dir.join("jobs").join(format!("{job_id}.pb")),
            &prost::Message::encode_to_vec(ev),
        )
    }
}

/// Writes `bytes` as `path` whole: a temporary file beside it, synced, then renamed over it, so
/// an agent that dies meanwhile leaves the old file or the new one, never half of one.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// The VM a command is about.
pub fn action_vm(action: &vim_proto::host_command::Action) -> &str {
    use vim_proto::host_command::Action;
    match action {
        Action::Create(s) => &s.vm_id,
        Action::Start(id)
        | Action::Delete(id)
        | Action::Info(id)
        | Action::AbortIncoming(id)
        | Action::Evict(id)
        | Action::Suspend(id) => id,
        Action::Resume(s) | Action::Standby(s) => &s.vm_id,
        Action::Stop(s) => &s.vm_id,
        Action::MigrateIn(m) => m.vm.as_ref().map_or("", |v| &v.vm_id),
        Action::MigrateOut(m) => &m.vm_id,
        Action::Resize(r) => &r.vm_id,
        Action::SetScaling(s) => &s.vm_id,
        Action::SetCheckpoints(s) => &s.vm_id,
    }
}

/// Where an agent with state directory `state_dir` keeps VM `id`'s VMM log (kept after the VM
/// leaves the host).
pub fn vmm_log_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("vms").join(format!("{id}.vmm.log"))
}

/// A checkpoint interval a VM may have: none, or 200 ms to an hour (each checkpoint pauses the
/// guest, and writes what changed to shared storage).
fn check_checkpoint_ms(ms: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        ms == 0 || (200..=3_600_000).contains(&ms),
        "checkpoint_ms must be 0 or 200 to 3600000"
    );
    Ok(())
}

impl Vm {
    /// Loads the records and re-adopts the VMMs that still run.
    pub fn load_all(dirs: &Arc<Dirs>) -> anyhow::Result<Vec<Vm>> {
        let mut vms = Vec::new();
        for e in std::fs::read_dir(dirs.state_dir.join("vms"))? {
            let p = e?.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let record: VmRecord = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
            let mut vm = Vm {
                dirs: dirs.clone(),
                record,
                child: None,
                cpu: CpuSample::default(),
            };
            let (id, r) = (vm.record.spec.vm_id.clone(), &mut vm.record);
            if r.state == VmState::Incoming {
                if alive(r.pid) && is_vmm(r.pid) {
                    tracing::info!(
                        vm = id,
                        pid = r.pid,
                        "re-adopted a VMM waiting for a migration"
                    );
                    vms.push(vm);
                } else if resumed_since(&dirs.migration_dir(&id), &dirs.record_path(&id)) {
                    // The handover happened (the VM ran here), and then its VMM died with the
                    // agent down, before the record said running.
                    tracing::warn!(vm = id, "a migrated VM's VMM gone while the agent was down");
                    r.state = VmState::Failed;
                    r.pid = 0;
                    vm.save()?;
                    vms.push(vm);
                } else {
                    tracing::info!(vm = id, "a migration that never came here: forgotten");
                    vm.forget();
                }
                continue;
            }
            if r.state == VmState::Standby {
                if alive(r.pid) && is_vmm(r.pid) {
                    tracing::info!(vm = id, pid = r.pid, "re-adopted a standby VMM");
                    vms.push(vm);
                } else {
                    // vimd sees it gone from the heartbeats and places another.
                    tracing::info!(vm = id, "a standby VMM gone while the agent was down");
                    vm.forget();
                }
                continue;
            }
            if r.outgoing && r.state == VmState::Running && !alive(r.pid) {
                let dir = dirs.migration_dir(&id);
                if let Some(outcome) = handed_over(&dir) {
                    tracing::info!(vm = id, "the VM moved away while the agent was down");
                    dirs.mark_moved(&id, &outcome)?;
                    vm.forget();
                    continue;
                }
            }
            if r.state == VmState::Running && alive(r.pid) && is_vmm(r.pid) {
                tracing::info!(vm = id, pid = r.pid, "re-adopted a running VMM");
            } else if let Some(pid) = serving_vmm(&r.api_socket) {
                // Started just before the agent died, too soon to be recorded.
                tracing::info!(
                    vm = id,
                    pid,
                    "adopted a VMM that was started but not recorded"
                );
                r.state = VmState::Running;
                r.pid = pid;
                vm.save()?;
            } else if r.state == VmState::Running {
                tracing::warn!(vm = id, pid = r.pid, "VMM gone while the agent was down");
                r.state = VmState::Failed;
                r.pid = 0;
                vm.save()?;
            }
            vms.push(vm);
        }
        Ok(vms)
    }

    /// A new VM's record (saved), not started. A VM deleted on this host is never created again
    /// (a create that reaches the agent after its delete does nothing).
    pub fn create(dirs: &Arc<Dirs>, spec: &VmSpec) -> anyhow::Result<Vm> {
        Vm::new_record(dirs, spec, VmState::Stopped)
    }

    /// The target side of a live migration: a record for the VM and a VMM waiting (at most
    /// `wait`) for its handover in the VM's migration directory.
    pub fn create_incoming(dirs: &Arc<Dirs>, spec: &VmSpec, wait: Duration) -> anyhow::Result<Vm> {
        let mut vm = Vm::new_record(dirs, spec, VmState::Incoming)?;
        let dir = dirs.migration_dir(&spec.vm_id);
        std::fs::create_dir_all(&dir)?;
        // The VMM opens the VM's tap (by the name in the migrated state) when the guest comes.
        if let Err(e) = vm.ensure_tap() {
            vm.forget();
            return Err(e);
        }
        let mut cmd = Command::new(&dirs.vmm);
        cmd.arg("run")
            .arg("--incoming")
            .arg(&dir)
            .args(["--incoming-timeout-ms", &wait.as_millis().to_string()]);
        if let Err(e) = vm.spawn_vmm(cmd, VmState::Incoming, Some(vmm_api::INCOMING_READY_LINE)) {
            vm.forget();
            return Err(e);
        }
        if dirs.jail.is_some() {
            let (dirs, pid) = (dirs.clone(), vm.record.pid);
            std::thread::spawn(move || adopt_handover(&dirs, &dir, pid, wait));
        }
        Ok(vm)
    }

    /// A suspended VM comes back here: a record for it and a VMM restoring its state from its
    /// `suspended` directory on shared storage (memory mapped lazily, so the guest runs at
    /// once). Ready once the restored VMM answers as running; an error (a missing or corrupt
    /// state, which the VMM refuses at once) leaves nothing behind.
    pub fn create_resumed(dirs: &Arc<Dirs>, spec: &VmSpec) -> anyhow::Result<Vm> {
        let dir = dirs.suspend_dir(&spec.vm_id);
        anyhow::ensure!(
            dir.join(vmm_api::SNAPSHOT_STATE_FILE).is_file(),
            "VM {} has no suspended state in {}",
            spec.vm_id,
            dir.display()
        );
        let mut vm = Vm::new_record(dirs, spec, VmState::Creating)?;
        let started = vm.ensure_tap().and_then(|_| {
            let mut cmd = Command::new(&dirs.vmm);
            cmd.arg("restore").arg("--snapshot").arg(&dir);
            vm.spawn_vmm(cmd, VmState::Running, None)?;
            vm.wait_serving(Duration::from_secs(30))
        });
        if let Err(e) = started {
            vm.abandon();
            return Err(e);
        }
        Ok(vm)
    }

    /// A VM restarted after a failure comes back from its newest usable checkpoint: a record
    /// and a VMM resuming it (`vmm restore --checkpoint`, which rolls its disks back to the
    /// checkpoint's instant). Without a usable checkpoint the record is left stopped, for the
    /// caller to boot it, and the answer says why.
    pub fn create_from_checkpoint(
        dirs: &Arc<Dirs>,
        spec: &VmSpec,
    ) -> anyhow::Result<(Vm, vim_proto::CheckpointResume)> {
        let mut vm = Vm::new_record(dirs, spec, VmState::Creating)?;
        let resumed = vm.resume_checkpoint()?;
        Ok((vm, resumed))
    }

    /// Starts a VMM resuming the VM from its newest usable checkpoint; without one the record
    /// is left stopped (for the caller to boot it), and the answer says why.
    fn resume_checkpoint(&mut self) -> anyhow::Result<vim_proto::CheckpointResume> {
        let dir = self.dirs.checkpoint_dir(self.id());
        let log = self.dirs.vmm_log(self.id());
        let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let started = self.ensure_tap().and_then(|_| {
            let mut cmd = Command::new(&self.dirs.vmm);
            cmd.arg("restore").arg("--checkpoint").arg(&dir);
            self.spawn_vmm(cmd, VmState::Running, None)?;
            self.wait_serving(Duration::from_secs(30))
        });
        let said = log_since(&log, log_start);
        let chosen = said
            .lines()
            .find_map(|l| l.strip_prefix(vmm_api::CHECKPOINT_RESUMED_LINE))
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok());
        match started {
            Ok(()) => {
                let c = chosen.unwrap_or_default();
                let resumed = vim_proto::CheckpointResume {
                    resumed: true,
                    seq: c["seq"].as_u64().unwrap_or(0),
                    taken_unix_ms: c["taken_unix_ms"].as_u64().unwrap_or(0),
                    skipped: c["skipped"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default(),
                    ..Default::default()
                };
                tracing::info!(
                    vm = self.id(),
                    seq = resumed.seq,
                    "resumed from a checkpoint"
                );
                Ok(resumed)
            }
            Err(e) => {
                self.stopped_after(&e);
                tracing::warn!(vm = self.id(), error = %e, "no checkpoint to resume from: booting");
                Ok(vim_proto::CheckpointResume {
                    why_not: format!("{e:#}"),
                    ..Default::default()
                })
            }
        }
    }

    /// The VMM that was to resume the VM failed: it is killed if it still runs, and the record
    /// says stopped.
    fn stopped_after(&mut self, why: &anyhow::Error) {
        tracing::debug!(vm = self.id(), error = %why, "VMM given up");
        if kill_vmm(self.record.pid) {
            self.reap();
        }
        self.record.pid = 0;
        self.record.state = VmState::Stopped;
        let _ = self.save();
    }

    /// A standby VMM for a VM that runs on another host (docs/standby.md): a record in state
    /// `standby` and a VMM holding the VM's memory from its checkpoints. Ready once it answers
    /// as a standby; an error leaves nothing behind.
    pub fn create_standby(dirs: &Arc<Dirs>, spec: &VmSpec) -> anyhow::Result<Vm> {
        let mut vm = Vm::new_record(dirs, spec, VmState::Creating)?;
        let dir = dirs.checkpoint_dir(&spec.vm_id);
        let started = vm.ensure_tap().and_then(|_| {
            std::fs::create_dir_all(&dir)?;
            let mut cmd = Command::new(&dirs.vmm);
            cmd.arg("restore")
                .arg("--checkpoint")
                .arg(&dir)
                .arg("--standby");
            vm.spawn_vmm(cmd, VmState::Standby, None)?;
            vm.wait_answering(Duration::from_secs(30), vmm_api::RunState::Standby)
        });
        if let Err(e) = started {
            vm.abandon();
            return Err(e);
        }
        Ok(vm)
    }

    /// A VMM that did not come up: killed if it still runs, and the VM forgotten here.
    fn abandon(&mut self) {
        if kill_vmm(self.record.pid) {
            self.reap();
        }
        self.forget();
    }

    pub fn is_standby(&self) -> bool {
        self.record.state == VmState::Standby
    }

    /// The VM's host failed and the VM is restarted here: its standby is promoted (the guest
    /// goes on from the newest checkpoint, with the memory the standby holds), or, if that
    /// fails, the standby is stopped and the VM resumed from its checkpoint as any other.
    pub fn promote_or_resume(&mut self) -> anyhow::Result<vim_proto::CheckpointResume> {
        let client = vmm_api::Client::new(&self.record.api_socket);
        match client.promote() {
            Ok(p) => {
                tracing::info!(
                    vm = self.id(),
                    seq = p.seq,
                    warm = p.warm,
                    took_ms = p.took_ms,
                    "standby promoted"
                );
                self.record.state = VmState::Running;
                self.save()?;
                Ok(vim_proto::CheckpointResume {
                    resumed: true,
                    seq: p.seq,
                    taken_unix_ms: p.taken_unix_ms,
                    skipped: p.skipped,
                    promoted: true,
                    ..Default::default()
                })
            }
            Err(e) => {
                let e = anyhow::Error::from(e).context("cannot promote the standby");
                tracing::warn!(vm = self.id(), error = %format!("{e:#}"), "resuming instead");
                self.stopped_after(&e);
                self.resume_checkpoint()
            }
        }
    }

    /// Writes a checkpoint of the running VM (docs/checkpoint.md); `None` when it is not
    /// running here.
    pub fn checkpoint(&mut self) -> Option<anyhow::Result<vmm_api::CheckpointDone>> {
        if !self.running_here() {
            return None;
        }
        let client = vmm_api::Client::new(&self.record.api_socket);
        Some(
            client
                .checkpoint(self.dirs.checkpoint_dir(self.id()))
                .map_err(anyhow::Error::from),
        )
    }

    /// Waits (at most `timeout`) for the VMM to answer as running; an error with the last line
    /// of its log if it exits first.
    fn wait_serving(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_answering(timeout, vmm_api::RunState::Running)
    }

    /// Waits (at most `timeout`) for the VMM to answer in state `want`; an error with the last
    /// line of its log if it exits first.
    fn wait_answering(&mut self, timeout: Duration, want: vmm_api::RunState) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let err = std::fs::read_to_string(self.dirs.vmm_log(self.id())).unwrap_or_default();
                anyhow::bail!("vmm exited ({st}): {}", err.lines().last().unwrap_or(""));
            }
            if vmm_info(&self.record.api_socket, Duration::from_millis(200))
                .is_some_and(|i| i.state == want)
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the restored VMM did not answer within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Suspends the VM to shared storage: paused, its complete state written to a new
    /// directory which replaces its `suspended` one only once whole (a VM running from the old
    /// one keeps its mapping of it), then its VMM stopped and the VM forgotten here. On an error
    /// before the state is whole the guest runs on, unharmed.
    pub fn suspend(&mut self) -> anyhow::Result<vmm_api::SnapshotDone> {
        anyhow::ensure!(self.running_here(), "the VM is not running here");
        let r = self.record.clone();
        let client = vmm_api::Client::new(&r.api_socket);
        client.pause()?;
        let dir = self.dirs.suspend_dir(self.id());
        let new = dir.with_extension("new");
        let _ = std::fs::remove_dir_all(&new);
        let done = match client.snapshot(&new) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&new);
                if let Err(r) = client.resume() {
                    tracing::error!(vm = self.id(), error = %r, "the VM did not resume after a failed suspend");
                }
                anyhow::bail!("the VM's state could not be written: {e}");
            }
        };
        let old = dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old)?;
        }
        std::fs::rename(&new, &dir)?;
        let _ = std::fs::remove_dir_all(&old);
        // The state is whole: the VMM (paused) goes, taking its disk lock and tap with it.
        let pid = r.pid;
        if kill_vmm(pid) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                self.reap();
                std::thread::sleep(Duration::from_millis(5));
            }
            anyhow::ensure!(!alive(pid), "VMM {pid} did not die");
        }
        self.reap();
        self.forget();
        Ok(done)
    }

    fn new_record(dirs: &Arc<Dirs>, spec: &VmSpec, state: VmState) -> anyhow::Result<Vm> {
        anyhow::ensure!(
            !dirs.is_deleted(&spec.vm_id),
            "VM {} has been deleted",
            spec.vm_id
        );
        let dir = dirs.vm_dir(&spec.vm_id);
        std::fs::create_dir_all(&dir)?;
        let vm = Vm {
            dirs: dirs.clone(),
            record: VmRecord {
                spec: spec.into(),
                pid: 0,
                state,
                api_socket: dirs.api_socket(&spec.vm_id),
                console: dir.join("console.log"),
                outgoing: false,
            },
            child: None,
            cpu: CpuSample::default(),
        };
        // Here again: a migration away from this host earlier is history.
        let _ = std::fs::remove_file(dirs.moved_marker(&spec.vm_id));
        vm.save()?;
        Ok(vm)
    }

    pub fn id(&self) -> &str {
        &self.record.spec.vm_id
    }

    fn save(&self) -> anyhow::Result<()> {
        replace_file(
            &self.dirs.record_path(self.id()),
            serde_json::to_string(&self.record)?.as_bytes(),
        )
    }

    pub fn report(&mut self) -> VmReport {
        self.refresh_incoming();
        let r = &self.record;
        let u = usage(r.pid, &mut self.cpu);
        // The balloon's count and the guest's memory use, without a round trip to the guest.
        let balloon = vmm_info(&r.api_socket, Duration::from_millis(200)).and_then(|i| i.balloon);
        VmReport {
            seq: next_report_seq(),
            vm_id: r.spec.vm_id.clone(),
            state: r.state.into(),
            pid: r.pid,
            cpu_pct: u.vcpu_pct,
            rss_kib: u.rss_kib,
            vmm_cpu_pct: u.vmm_pct,
            balloon_mib: balloon.and_then(|b| b.actual_mib).unwrap_or(0),
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            memory_used_pct: balloon.and_then(|b| b.used_pct),
        }
    }

    /// Watches new scaling thresholds (or none).
    pub fn set_scaling(&mut self, w: Option<&vim_proto::ScalingWatch>) -> anyhow::Result<()> {
        self.record.spec.scaling = w.map(WatchRecord::from);
        self.save()
    }

    /// How often the VM is checkpointed from now on (the supervisor's timer follows the record).
    pub fn set_checkpoints(&mut self, checkpoint_ms: u32) -> anyhow::Result<()> {
        self.record.spec.checkpoint_ms = checkpoint_ms;
        self.save()
    }

    /// Changes the running VM's vCPUs and, when `memory_mib` is given, its memory (its VMM waits
    /// for the guest). The record keeps what the VM has afterwards, all of the resize or the part
    /// the guest did, so a restart boots it at that size.
    pub fn resize(&mut self, req: &vim_proto::ResizeVm) -> anyhow::Result<()> {
        let (vcpus, mut memory_mib) = (req.vcpus, (req.memory_mib > 0).then_some(req.memory_mib));
        anyhow::ensure!(self.running_here(), "the VM is not running here");
        let r = &self.record;
        let max = r.spec.max_vcpus.max(r.spec.vcpus);
        anyhow::ensure!(
            vcpus <= max,
            "{vcpus} vCPUs is more than the VM's maximum, {max}"
        );
        let client = vmm_api::Client::new(&r.api_socket);
        if let (true, Some(m)) = (req.clamp_memory, memory_mib) {
            // What the VMM booted with is its floor (its configuration says).
            let booted = client
                .info(Duration::from_secs(5))?
                .config
                .get("memory_mib")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            memory_mib = Some(m.max(booted));
        }
        // The cgroup's limits grow before the guest does, and shrink after it has.
        let (old_vcpus, old_mib) = (r.spec.vcpus, r.spec.memory_mib);
        self.set_limits(
            vcpus.max(old_vcpus),
            memory_mib.unwrap_or(old_mib).max(old_mib),
        );
        let result = client.resize(Some(vcpus), memory_mib, vmm_api::DEFAULT_RESIZE_TIMEOUT_MS);
        let now = match &result {
            Ok(done) => Some(done.new),
            Err(_) => client
                .info(Duration::from_secs(5))
                .ok()
                .map(|i| vmm_api::Size {
                    vcpus: i.vcpus,
                    memory_mib: i.memory_mib,
                }),
        };
        if let Some(n) = now {
            self.set_limits(n.vcpus, n.memory_mib);
            let spec = &mut self.record.spec;
            if (n.vcpus, n.memory_mib) != (spec.vcpus, spec.memory_mib) {
                spec.vcpus = n.vcpus;
                spec.memory_mib = n.memory_mib;
                self.save()?;
            }
        }
        result.map(|_| ()).map_err(anyhow::Error::from)
    }

    /// The VM's cgroup limits for a size (a VM not jailed has none).
    fn set_limits(&self, vcpus: u32, memory_mib: u64) {
        if let Some(jail) = &self.dirs.jail {
            if let Err(e) = jail.cgroups.set_limits(self.id(), vcpus, memory_mib) {
                tracing::warn!(vm = self.id(), error = %e, "cannot set the VM's cgroup limits");
            }
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let id = self.id().to_string();
        let r = &self.record;
        if r.state == VmState::Running && alive(r.pid) {
            return Ok(());
        }
        if let Some(pid) = serving_vmm(&r.api_socket) {
            tracing::info!(vm = id, pid, "adopted the VMM already serving this VM");
            return self.record_running(pid);
        }
        // A boot starts the guest afresh: a checkpoint from before would take its disk back in
        // time if it were resumed later.
        let ckpt = self.dirs.checkpoint_dir(&id);
        if ckpt.exists() {
            std::fs::remove_dir_all(&ckpt)
                .with_context(|| format!("cannot remove old checkpoints in {}", ckpt.display()))?;
        }
        let r = &self.record;
        let s = &r.spec;
        let mut cmd = Command::new(&self.dirs.vmm);
        cmd.arg("run")
            .args(["--kernel", &s.kernel])
            .args(["--vcpus", &s.vcpus.to_string()])
            .args(["--max-vcpus", &s.max_vcpus.max(s.vcpus).to_string()])
            .args(["--memory-mib", &s.memory_mib.to_string()])
            .args([
                "--max-memory-mib",
                &s.max_memory_mib.max(s.memory_mib).to_string(),
            ])
            .args(["--cmdline", &s.cmdline])
            // Every VM gets a balloon, so memory can be taken back from a running guest, and
            // reports its memory use every second (the scaling watch's sample).
            .args(["--balloon", "deflate-on-oom", "--balloon-stats-ms", "1000"]);
        if !s.initrd.is_empty() {
            cmd.args(["--initrd", &s.initrd]);
        }
        if !s.disk.is_empty() {
            cmd.args(["--disk", &s.disk]);
        }
        if let Some(tap) = self.ensure_tap()? {
            cmd.args(["--net", &format!("tap={tap},mac={}", s.mac)]);
        }
        self.spawn_vmm(cmd, VmState::Running, None)
    }

    /// The VM's tap on the host bridge, if it has a NIC.
    fn ensure_tap(&self) -> anyhow::Result<Option<String>> {
        if self.record.spec.mac.is_empty() {
            return Ok(None);
        }
        let owner = self.dirs.jail.as_ref().map(|j| j.uid);
        crate::net::ensure_tap(self.id(), &self.dirs.bridge, owner).map(Some)
    }

    /// Starts `cmd` (a `vmm run …`) with the VM's console and API socket, in its own process
    /// group (it outlives an agent restart), and records it at once as `state`. A VMM that
    /// refuses its configuration exits at once: that is an error, and the record goes back.
    /// With `ready`, the VMM says on stderr when it is ready, and is waited for no longer.
    fn spawn_vmm(
        &mut self,
        mut cmd: Command,
        state: VmState,
        ready: Option<&str>,
    ) -> anyhow::Result<()> {
        let id = self.id().to_string();
        let before = self.record.state;
        let vm_dir = self.dirs.vm_dir(&id);
        std::fs::create_dir_all(&vm_dir)?;
        // No VMM of this VM runs here now: its socket goes where this agent keeps them (a
        // record from an older agent may name another place).
        let run_dir = self.dirs.run_dir(&id);
        std::fs::create_dir_all(&run_dir)?;
        self.record.api_socket = self.dirs.api_socket(&id);
        let _ = std::fs::remove_file(&self.record.api_socket);
        if let Some(jail) = &self.dirs.jail {
            let s = &self.record.spec;
            let existing = |p: &str| (!p.is_empty() && Path::new(p).exists()).then(|| p.into());
            let mut writable = vec![vm_dir.clone(), run_dir.clone()];
            writable.extend(existing(&s.disk));
            for p in &writable {
                jail.own(p)?;
            }
            let mut read_only = vec![
                self.dirs.vmm.clone(),
                crate::lease::dir(&self.dirs.state_dir),
                // The lease's clock is this boot's (vmm_api::lease); the host's memory size
                // bounds a VM's.
                "/proc/sys/kernel/random/boot_id".into(),
                "/proc/meminfo".into(),
            ];
            for p in [&s.kernel, &s.initrd]
                .into_iter()
                .filter_map(|p| existing(p))
            {
                jail.let_read(&p)?;
                read_only.push(p);
            }
            // A disk in the VM's directory is reached through it, not bound on its own: a
            // resume from a checkpoint renames the checkpoint's copy into its place.
            writable.retain(|p| p == &vm_dir || !p.starts_with(&vm_dir));
            let plan = crate::jail::Plan {
                read_only,
                writable,
                net: !s.mac.is_empty(),
                libraries: crate::jail::dynamically_linked(&self.dirs.vmm),
            };
            jail.confine(&mut cmd, &id, &plan, (s.vcpus, s.memory_mib))?;
        }
        cmd.arg("--state-root")
            .arg(&vm_dir)
            .arg("--lease")
            .arg(crate::lease::file(&self.dirs.state_dir))
            .arg("--serial")
            .arg(format!("file:{}", self.record.console.display()))
            .arg("--api-socket")
            .arg(&self.record.api_socket);
        let log_path = self.dirs.vmm_log(&id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let log_start = log.metadata()?.len();
        // Its own process group: the VMM outlives an agent restart.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                // A jail that could not be set up said which step failed on the log.
                let why = log_since(&log_path, log_start);
                anyhow::anyhow!(
                    "cannot start {}: {e} {}",
                    self.dirs.vmm.display(),
                    why.lines().last().unwrap_or("")
                )
            })?;
        let pid = child.id();
        self.child = Some(child);
        // Recorded at once: an agent that dies from here on finds it at restart.
        self.record.pid = pid;
        self.record.state = state;
        self.save()?;
        // A VMM that refuses its configuration exits at once: say so now. One that says when it
        // is ready is waited for until then (bounded), the others for 50 ms.
        let deadline =
            Instant::now() + Duration::from_millis(if ready.is_some() { 2000 } else { 50 });
        let exited = loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                break Some(st);
            }
            if Instant::now() >= deadline
                || ready.is_some_and(|r| log_since(&log_path, log_start).contains(r))
            {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Some(st) = exited {
            self.child = None;
            self.record.pid = 0;
            self.record.state = before;
            self.save()?;
            let err = std::fs::read_to_string(&log_path).unwrap_or_default();
            anyhow::bail!(
                "vmm exited at once ({st}): {}",
                err.lines().last().unwrap_or("")
            );
        }
        Ok(())
    }

    fn record_running(&mut self, pid: u32) -> anyhow::Result<()> {
        self.record.pid = pid;
        self.record.state = VmState::Running;
        self.save()
    }

    /// Graceful power-off through the VMM's API (the VMM forces it after `timeout`), then SIGKILL
    /// if the process is still there.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        // A VMM that was waiting for a migration may run the VM by now: stopped like any other
        // then; one still waiting is aborted.
        self.refresh_incoming();
        if self.record.state == VmState::Incoming {
            return self.abort_incoming();
        }
        let r = self.record.clone();
        if r.state == VmState::Running && alive(r.pid) {
            // The answer comes when the guest has stopped; a VMM that does not answer is killed
            // below all the same.
            if let Err(e) = vmm_api::Client::new(&r.api_socket).shutdown(timeout.as_millis() as u64)
            {
                tracing::warn!(vm = %r.spec.vm_id, error = %e, "the VMM did not take the shutdown");
            }
            let deadline = Instant::now() + timeout + Duration::from_secs(5);
            while alive(r.pid) && Instant::now() < deadline {
                self.reap();
                std::thread::sleep(Duration::from_millis(20));
            }
            if alive(r.pid) {
                // SAFETY: kill(2) on the VMM's pid, which we started and checked is alive.
                unsafe { libc::kill(r.pid as i32, libc::SIGKILL) };
            }
            self.reap();
        }
        self.record.state = VmState::Stopped;
        self.record.pid = 0;
        self.save()
    }

    /// The target side of a migration that will not come: the waiting VMM (which has not
    /// claimed the VM: it would be running, not incoming, then) is stopped and the record goes.
    /// Nothing to do for a VM that is not incoming here.
    pub fn abort_incoming(&mut self) -> anyhow::Result<()> {
        if self.record.state != VmState::Incoming {
            return Ok(());
        }
        self.refresh_incoming();
        anyhow::ensure!(
            self.record.state == VmState::Incoming,
            "the VM already runs here: the handover happened"
        );
        let pid = self.record.pid;
        if pid != 0 && alive(pid) && is_vmm(pid) {
            // SAFETY: kill(2) on the waiting VMM this agent started (checked alive and a vmm).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid != 0 && alive(pid) && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reap();
        self.forget();
        Ok(())
    }

    /// An incoming VMM whose guest has been handed over and resumed serves its API as a running
    /// VM: the record follows.
    /// Whether the VM runs here: its VMM alive and the guest running (a VM that just migrated
    /// in counts once its VMM says the guest runs, before any report has noticed).
    fn running_here(&mut self) -> bool {
        self.refresh_incoming();
        self.record.state == VmState::Running && alive(self.record.pid)
    }

    pub fn refresh_incoming(&mut self) {
        if self.record.state != VmState::Incoming {
            return;
        }
        if let Some(info) = vmm_info(&self.record.api_socket, Duration::from_millis(500)) {
            if info.state == vmm_api::RunState::Running && info.pid == self.record.pid {
                tracing::info!(vm = self.id(), "the migrated VM runs here");
                self.record.state = VmState::Running;
                let _ = self.save();
            }
        }
    }

    /// The source side of a live migration: hands the running VM over to the VMM waiting on
    /// another host, and waits for the outcome. On `completed` the VM lives elsewhere: its VMM
    /// has exited and this host forgets it (no tombstone: it may come back). Otherwise it runs
    /// here still (or, if the target claimed it and went silent, stays paused here).
    /// `progress` hears where the migration is, about once a second, while it runs.
    pub fn migrate_out(
        &mut self,
        downtime_ms: u64,
        handover_timeout_ms: u64,
        progress: &(dyn Fn(vmm_api::MigrationProgress) + Sync),
    ) -> Result<vmm_api::MigrationOutcome, String> {
        let r = self.record.clone();
        let dir = self.dirs.migration_dir(self.id());
        if r.outgoing && !alive(r.pid) {
            // Asked before, by this agent before it restarted, and handed over meanwhile.
            if let Some(outcome) = handed_over(&dir) {
                self.reap();
                self.dirs
                    .mark_moved(self.id(), &outcome)
                    .map_err(|e| format!("{e:#}"))?;
                self.forget();
                return Ok(outcome);
            }
        }
        if !self.running_here() {
            return Err(format!("VM {} is not running here", r.spec.vm_id));
        }
        let req = vmm_api::Request::Migrate {
            dir: dir.clone(),
            downtime_ms,
            max_rounds: vmm_api::DEFAULT_MAX_ROUNDS,
            timeout_ms: handover_timeout_ms,
        };
        self.record.outgoing = true;
        self.save().map_err(|e| format!("{e:#}"))?;
        // The target's answer (`resumed`, `failed`), for a jailed VMM to read: while the
        // migration is under way, and after it if the VMM waits for the target, until the
        // answer is the VMM user's (the previous migration's answers were retired at its start).
        const UNDER_WAY: u8 = 0;
        const OVER: u8 = 1;
        const WAITING: u8 = 2;
        let phase = Arc::new(std::sync::atomic::AtomicU8::new(UNDER_WAY));
        if self.dirs.jail.is_some() {
            let (dirs, dir, phase, pid) = (self.dirs.clone(), dir.clone(), phase.clone(), r.pid);
            std::thread::spawn(move || {
                use std::os::unix::fs::MetadataExt;
                let Some(jail) = &dirs.jail else {
                    return;
                };
                let answers = [
                    vmm_api::MIGRATION_RESUMED_FILE,
                    vmm_api::MIGRATION_FAILED_FILE,
                ];
                let answered = || {
                    answers.iter().any(|f| {
                        std::fs::symlink_metadata(dir.join(f)).is_ok_and(|m| m.uid() == jail.uid)
                    })
                };
                adopt_from_unjailed(jail, &dir, &answers, || {
                    match phase.load(std::sync::atomic::Ordering::Relaxed) {
                        UNDER_WAY => alive(pid),
                        WAITING => alive(pid) && !answered(),
                        _ => false,
                    }
                });
            });
        }
        let client = vmm_api::Client::new(&r.api_socket);
        let answer = watch_progress(&r.api_socket, progress, || {
            client.call::<vmm_api::MigrationOutcome>(&req, MAX_MIGRATION_WAIT)
        });
        let waiting = matches!(&answer, Ok(o) if o.waiting_for_target);
        phase.store(
            if waiting { WAITING } else { OVER },
            std::sync::atomic::Ordering::Relaxed,
        );
        let outcome = match answer {
            Ok(o) => o,
            // Asked already, by this agent before it restarted: that migration's end is awaited.
            Err(vmm_api::ClientError::Refused(e)) if e.contains("migration is in progress") => {
                self.await_migration(&client, &dir)?
            }
            Err(e) => {
                self.record.outgoing = false;
                let _ = self.save();
                return Err(format!("migration: {e}"));
            }
        };
        if outcome.status == vmm_api::MigrationStatus::Completed {
            // The VMM exits right after answering.
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(r.pid) && Instant::now() < deadline {
                self.reap();
                std::thread::sleep(Duration::from_millis(10));
            }
            self.reap();
            self.dirs
                .mark_moved(self.id(), &outcome)
                .map_err(|e| format!("{e:#}"))?;
            self.forget();
        } else if !outcome.waiting_for_target {
            self.record.outgoing = false;
            let _ = self.save();
        }
        Ok(outcome)
    }

    /// Waits for a migration the VMM is already running (asked by this agent before it
    /// restarted; its answer went to the old connection): until the VMM exits (handed over, if
    /// the directory says so) or runs the guest here again.
    fn await_migration(
        &mut self,
        client: &vmm_api::Client,
        dir: &Path,
    ) -> Result<vmm_api::MigrationOutcome, String> {
        let pid = self.record.pid;
        let deadline = Instant::now() + MAX_MIGRATION_WAIT;
        while Instant::now() < deadline {
            if !alive(pid) {
                self.reap();
                return handed_over(dir).ok_or_else(|| {
                    "the VMM exited during the migration without handing the VM over".to_string()
                });
            }
            if let Ok(info) = client.info(Duration::from_secs(2)) {
                if info.migration.is_none() {
                    return Err(format!(
                        "the migration ended while the agent was restarting; the VM runs here ({:?})",
                        info.state
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("the migration did not end in time".into())
    }

    /// Drops the VM's record: it does not live on this host (any more).
    fn forget(&mut self) {
        // What a VMM of ours may have written as a migration target that never took the VM
        // (the source removes the rest of a failed migration's files).
        if self.record.state == VmState::Incoming {
            let _ = std::fs::remove_file(
                self.dirs
                    .migration_dir(self.id())
                    .join(vmm_api::WATCHING_FILE),
            );
        }
        self.record.pid = 0;
        self.record.state = VmState::Deleted;
        let _ = std::fs::remove_file(self.dirs.record_path(self.id()));
        let _ = std::fs::remove_file(&self.record.api_socket);
        let _ = std::fs::remove_dir(self.dirs.run_dir(self.id()));
        if let Some(jail) = &self.dirs.jail {
            jail.remove(self.id());
        }
        if !self.record.spec.mac.is_empty() {
            crate::net::remove_tap(self.id());
        }
    }

    /// A `migrate_in` for a VM this host already keeps: fine while its VMM still waits (the
    /// command came twice), refused otherwise (the VM runs or is stopped here).
    pub fn expect_incoming(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.record.state == VmState::Incoming && alive(self.record.pid),
            "VM {} is already on this host ({})",
            self.id(),
            self.record.state
        );
        Ok(())
    }

    /// The VM runs on another host now (restarted there while this one was cut off): its VMM,
    /// if it still runs, is killed at once — a graceful stop would let the guest write a disk
    /// that is another VMM's now — and the VM is forgotten, without a tombstone (it may come
    /// back) and without touching its files on shared storage (they are the VM's).
    pub fn evict(&mut self) -> anyhow::Result<()> {
        let pid = self.record.pid;
        if kill_vmm(pid) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                self.reap();
                std::thread::sleep(Duration::from_millis(10));
            }
            anyhow::ensure!(!alive(pid), "VMM {pid} did not die");
        }
        self.reap();
        self.forget();
        Ok(())
    }

    /// Whether this host still keeps the VM.
    pub fn gone(&self) -> bool {
        self.record.state == VmState::Deleted
    }

    /// Stops the VM and forgets it; it is never created here again.
    pub fn delete(&mut self) -> anyhow::Result<()> {
        self.dirs.mark_deleted(self.id())?;
        self.stop(Duration::from_secs(5))?;
        self.forget();
        Ok(())
    }

    fn reap(&mut self) {
        if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
            self.child = None;
        }
    }

    /// Why the VMM exited on its own since the last call (crash, or the guest powered off).
    pub fn exited(&mut self) -> Option<String> {
        if self.record.state == VmState::Incoming {
            self.refresh_incoming();
        }
        if self.record.state == VmState::Incoming {
            // A waiting VMM that gave up (no handover in time, or the source took the VM back)
            // ends quietly: the VM never ran here.
            let done = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some()
                || !alive(self.record.pid);
            if done {
                tracing::info!(vm = self.id(), "the waiting VMM ended without a handover");
                self.child = None;
                self.forget();
            }
            return None;
        }
        if self.record.state == VmState::Standby {
            let done = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some()
                || !alive(self.record.pid);
            if done {
                // Not the VM failing: it runs elsewhere. vimd sees the standby gone from the
                // heartbeats and places another.
                let log = std::fs::read_to_string(self.dirs.vmm_log(self.id())).unwrap_or_default();
                tracing::warn!(
                    vm = self.id(),
                    last = log.lines().last().unwrap_or(""),
                    "the standby VMM ended"
                );
                self.child = None;
                self.forget();
            }
            return None;
        }
        if self.record.state != VmState::Running {
            return None;
        }
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if status.is_none() && alive(self.record.pid) {
            return None;
        }
        self.child = None;
        // A VMM that exits after handing its VM over (the agent that asked for the migration
        // restarted meanwhile): the VM moved, it did not fail.
        if self.record.outgoing {
            if let Some(outcome) = handed_over(&self.dirs.migration_dir(self.id())) {
                tracing::info!(vm = self.id(), "the VM moved to another host");
                let _ = self.dirs.mark_moved(self.id(), &outcome);
                self.forget();
                return None;
            }
        }
        let (state, why) = match status {
            Some(st) if st.success() => (VmState::Stopped, "the guest powered off".to_string()),
            Some(st) if st.code() == Some(vmm_api::lease::FENCED_EXIT) => (
                VmState::Failed,
                "fenced: the host's lease lapsed, the VMM stopped the guest".to_string(),
            ),
            Some(st) if st.code() == Some(vmm_api::SECCOMP_EXIT) => {
                // The line that names the thread and the call: a VMM a guest may have taken over.
                let log = std::fs::read_to_string(self.dirs.vmm_log(self.id())).unwrap_or_default();
                let line = log
                    .lines()
                    .rfind(|l| l.contains("vmm: seccomp:"))
                    .unwrap_or("no seccomp line in its log");
                (
                    VmState::Failed,
                    format!("the VMM broke its seccomp filter and was stopped: {line}"),
                )
            }
            Some(st) => (VmState::Failed, format!("the VMM exited: {st}")),
            None => (VmState::Failed, "the VMM process disappeared".to_string()),
        };
        self.record.state = state;
        self.record.pid = 0;
        let _ = self.save();
        Some(why)
    }
}

/// The outcome of a handover found in a migration directory: the target claimed the VM and
/// resumed it (the files a source clears before it starts, so they are this migration's). Its
/// figures are not known here; only that it completed.
/// What was appended to `path` after its first `from` bytes (bounded: a readiness line is near).
fn log_since(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek};
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(std::io::SeekFrom::Start(from)).is_ok() {
            let _ = f.take(64 * 1024).read_to_string(&mut text);
        }
    }
    text
}

/// Runs `f` (a migration the VMM carries out) while another connection reads the VMM's progress
/// every second and hands it to `progress`.
fn watch_progress<T>(
    api_socket: &Path,
    progress: &(dyn Fn(vmm_api::MigrationProgress) + Sync),
    f: impl FnOnce() -> T,
) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let client = vmm_api::Client::new(api_socket);
            let mut next = Instant::now() + Duration::from_millis(500);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                if Instant::now() < next {
                    continue;
                }
                next = Instant::now() + Duration::from_secs(1);
                if let Ok(Some(p)) = client.info(Duration::from_secs(1)).map(|i| i.migration) {
                    progress(p);
                }
            }
        });
        let r = f();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    })
}

/// Whether a handover in `dir` resumed the guest after `record` was last written (an incoming
/// record is written when its VMM starts waiting, so an older handover is another migration's).
fn resumed_since(dir: &Path, record: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    handed_over(dir).is_some()
        && matches!(
            (modified(&dir.join("resumed")), modified(record)),
            (Some(r), Some(w)) if r >= w
        )
}

fn handed_over(dir: &Path) -> Option<vmm_api::MigrationOutcome> {
    let claimed = std::fs::read_to_string(dir.join("claimed")).ok()?;
    if !claimed.starts_with("target") || !dir.join("resumed").exists() {
        return None;
    }
    Some(vmm_api::MigrationOutcome {
        status: vmm_api::MigrationStatus::Completed,
        downtime_ms: None,
        total_ms: 0.0,
        rounds: 0,
        bytes_written: 0,
        error: None,
        waiting_for_target: false,
    })
}

/// What a VMM process uses: CPU of its vCPU threads and of the rest (% of one core since the
/// last sample), and its resident memory.
#[derive(Debug, Default, PartialEq)]
struct Usage {
    vcpu_pct: f64,
    vmm_pct: f64,
    rss_kib: u64,
}

/// The VMM's `info` over its API socket, if it answers within `timeout`.
fn vmm_info(api_socket: &Path, timeout: Duration) -> Option<vmm_api::Info> {
    vmm_api::Client::new(api_socket).info(timeout).ok()
}

/// The pid of a VMM already serving `api_socket` (started by an agent that died before it could
/// record it), if there is one.
fn serving_vmm(api_socket: &Path) -> Option<u32> {
    let info = vmm_info(api_socket, Duration::from_secs(2))?;
    // A standby is no running VM.
    let pid = Some(info.pid).filter(|_| info.state != vmm_api::RunState::Standby)?;
    (alive(pid) && is_vmm(pid)).then_some(pid)
}

/// CPU ticks (utime + stime) of one thread's or process's `stat` line.
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the ")" closing the command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU ticks of a process's vCPU threads (named `vcpuN` by the VMM) and of all its threads.
fn thread_ticks(pid: u32) -> (u64, u64) {
    let all = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0);
    let mut vcpu = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let is_vcpu = std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with("vcpu"));
            if is_vcpu {
                vcpu += std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| stat_ticks(&s))
                    .unwrap_or(0);
            }
        }
    }
    (vcpu, all)
}

fn usage(pid: u32, last: &mut CpuSample) -> Usage {
    if pid == 0 {
        return Usage::default();
    }
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let now = Instant::now();
    if last
        .at
        .is_some_and(|at| now.duration_since(at) < MIN_CPU_INTERVAL)
    {
        return Usage {
            vcpu_pct: last.pct.0,
            vmm_pct: last.pct.1,
            rss_kib,
        };
    }
    let (vcpu, all) = thread_ticks(pid);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (vcpu_pct, vmm_pct) = match last.at {
        // A process's ticks only grow; a smaller count is another process (the pid was reused).
        Some(at) if vcpu >= last.vcpu_ticks && all >= last.ticks => {
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            let pct = |t: u64| t as f64 / hz / secs * 100.0;
            let dv = vcpu - last.vcpu_ticks;
            let da = all - last.ticks;
            (pct(dv), pct(da.saturating_sub(dv)))
        }
        _ => (0.0, 0.0),
    };
    *last = CpuSample {
        ticks: all,
        vcpu_ticks: vcpu,
        at: Some(now),
        pct: (vcpu_pct, vmm_pct),
    };
    Usage {
        vcpu_pct,
        vmm_pct,
        rss_kib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose main thread has exited (a zombie) while another of its threads still
    /// runs is alive: it holds its files. Once the last thread is gone, it is not, reaped or not.
    #[test]
    fn a_zombie_leader_with_threads_left_is_alive() {
        let script = "import threading, time, ctypes\n\
                      threading.Thread(target=time.sleep, args=(1.5,)).start()\n\
                      time.sleep(0.2)\n\
                      ctypes.CDLL(None).pthread_exit(None)\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(700));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(
            stat.contains(") Z "),
            "the main thread has not exited: {stat}"
        );
        assert!(alive(pid), "a thread still runs");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!alive(pid), "every thread has exited");
        child.wait().unwrap();
    }

    /// CPU use is measured over half a second at least: a report right after another repeats
    /// the last figure instead of reading a few ticks over a few milliseconds.
    #[test]
    fn cpu_use_is_measured_over_a_long_enough_interval() {
        let me = std::process::id();
        let mut last = CpuSample::default();
        usage(me, &mut last);
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(600) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let busy = usage(me, &mut last);
        assert!(busy.vmm_pct > 50.0, "{busy:?}");
        let again = usage(me, &mut last);
        assert_eq!(
            (again.vcpu_pct, again.vmm_pct),
            (busy.vcpu_pct, busy.vmm_pct)
        );
    }
    use std::sync::mpsc;

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into our own timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A thread with this name that burns `ms` of CPU (its own CPU time, not wall time: on a
    /// loaded machine 400 ms of wall time can be a fraction of that), then stays alive (its
    /// ticks stay in /proc/PID/task) until the returned sender is dropped.
    fn burner(name: &str, ms: u64) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let (burnt_tx, burnt_rx) = mpsc::channel::<()>();
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let t = thread_cpu();
                let mut x = 0u64;
                while thread_cpu() - t < Duration::from_millis(ms) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                let _ = burnt_tx.send(());
                let _ = done_rx.recv();
            })
            .unwrap();
        burnt_rx.recv().unwrap();
        (done_tx, h)
    }

    /// The agent refuses what it must not run, whoever sent it, and never re-creates a VM
    /// it deleted.
    #[test]
    fn commands_outside_the_store_are_refused_and_deleted_vms_stay_deleted() {
        use vim_proto::host_command::Action;
        let d = tempfile::tempdir().unwrap();
        let (state, shared) = (d.path().join("state"), d.path().join("shared"));
        std::fs::create_dir_all(shared.join("images/tg")).unwrap();
        let kernel = shared.join("images/tg/kernel");
        std::fs::write(&kernel, b"k").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", shared.join("images/tg/link")).unwrap();
        let dirs = Arc::new(Dirs::new(&state, &shared, Path::new("/nonexistent/vmm")).unwrap());
        let spec = |id: &str, kernel: &str, disk: &str| VmSpec {
            vm_id: id.into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: kernel.into(),
            disk: disk.into(),
            ..Default::default()
        };
        let k = kernel.to_str().unwrap();
        assert!(dirs
            .check_command(&Action::Create(spec("v1", k, "")))
            .is_ok());
        let link = shared.join("images/tg/link");
        let escape = format!("{}/images/../../../etc/hostname", shared.display());
        for (id, kern, disk) in [
            ("../x", k, ""),
            ("v1", "/etc/hostname", ""),
            ("v1", escape.as_str(), ""),
            ("v1", k, link.to_str().unwrap()),
            ("v1", k, "/dev/sda"),
            ("v1", shared.join("images").to_str().unwrap(), ""),
        ] {
            let r = dirs.check_command(&Action::Create(spec(id, kern, disk)));
            assert!(r.is_err(), "accepted {id} {kern} {disk}");
        }
        assert!(dirs.check_command(&Action::Delete("/etc".into())).is_err());
        let mut v2 = Vm::create(&dirs, &spec("v2", k, "")).unwrap();
        v2.delete().unwrap();
        let e = Vm::create(&dirs, &spec("v2", k, ""))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("deleted"), "{e}");
    }

    /// Guest CPU is what the `vcpuN` threads used; the VMM's other threads count apart.
    #[test]
    fn vcpu_threads_counted_apart() {
        let pid = std::process::id();
        let (v0, a0) = thread_ticks(pid);
        let (stop_vcpu, vcpu) = burner("vcpu0", 400);
        let (v1, a1) = thread_ticks(pid);
        let (stop_worker, worker) = burner("worker", 400);
        let (v2, a2) = thread_ticks(pid);
        assert!(
            v1 - v0 >= 20,
            "vCPU thread's 400 ms not counted: {v0} -> {v1}"
        );
        // The process line and the thread lines round runtime to ticks separately (and
        // split user/system apart), so they may disagree by a tick or two.
        assert!(
            a1 - a0 + 3 >= v1 - v0,
            "process total below its vCPU part: {a0} -> {a1}, vCPU {v0} -> {v1}"
        );
        assert!(
            a2 - a1 >= 20,
            "worker's 400 ms not in the process total: {a1} -> {a2}"
        );
        assert!(
            v2 <= v1 + 5,
            "a non-vCPU thread counted as guest CPU: {v1} -> {v2}"
        );
        drop((stop_vcpu, stop_worker));
        vcpu.join().unwrap();
        worker.join().unwrap();
    }
}
