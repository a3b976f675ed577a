//! vCPUs: creation and boot state, the run loop on a thread of its own, and the control that pauses,
//! resumes and stops them.
//!
//! To get a vCPU out of `KVM_RUN` the controller sends its thread a real-time signal; the handler
//! does nothing, so `KVM_RUN` returns `EINTR` and the loop looks at the requested state. A signal
//! that lands just before `KVM_RUN` is entered would be lost, so the controller repeats the kick
//! until every vCPU has acknowledged.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::{cpuid, msr, regs};
use crate::boot::BootEntry;
use crate::devices::power::{ExitReason, ExitSignal};
use crate::devices::Bus;
use crate::migration::{MigrationError, Pausable, Snapshottable, State, Versioned};
use crate::seccomp::Kind;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("cannot configure vCPU {index} ({what}): {err}")]
    Configure {
        index: u8,
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vCPUs did not stop within {0:?}")]
    PauseTimeout(Duration),
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `slots` with CPUID, MSRs, LAPIC and FPU set; given the boot entry,
    /// the boot vCPU (0) also gets the entry registers. The others (and every vCPU restored or
    /// hot-added) wait for INIT/SIPI from the guest or get their registers restored.
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        supported_cpuid: &CpuId,
        index: u8,
        slots: u8,
        boot: Option<&BootEntry>,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        let cfg = |what| move |err| VcpuError::Configure { index, what, err };
        fd.set_cpuid2(&cpuid::configure(supported_cpuid, index, slots))
            .map_err(cfg("CPUID"))?;
        let refused = msr::set_msrs_tolerant(&fd, &msr::boot_msrs());
        if !refused.is_empty() && index == 0 {
            tracing::info!(?refused, "host refused some boot MSRs");
        }
        regs::setup_lapic(&fd).map_err(cfg("LAPIC"))?;
        regs::setup_fpu(&fd).map_err(cfg("FPU"))?;
        if let (0, Some(boot)) = (index, boot) {
            regs::setup_vcpu(&fd, boot.entry, boot.boot_info, boot.mode)
                .map_err(cfg("registers"))?;
        }
        Ok(Vcpu { index, fd })
    }

    /// A one-line summary of the registers, for fatal-exit messages.
    pub fn describe_registers(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rflags={:#x} \
                 cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip,
                r.rsp,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rflags,
                s.cs.selector,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        }
    }
}

/// The requested run state of all vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requested {
    Run,
    Pause,
}

struct ControlState {
    requested: Requested,
    paused: usize,
}

/// Shared between the VMM and the vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl VcpuControl {
    fn new() -> Self {
        VcpuControl {
            state: Mutex::new(ControlState {
                requested: Requested::Run,
                paused: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        crate::devices::lock(&self.state)
    }

    /// Called by a vCPU thread between runs: parks while a pause is requested, unless this vCPU
    /// is told to stop (it was removed).
    fn checkpoint(&self, stop: &AtomicBool) {
        let mut s = self.lock();
        if s.requested == Requested::Run {
            return;
        }
        s.paused += 1;
        self.changed.notify_all();
        while s.requested == Requested::Pause && !stop.load(Ordering::SeqCst) {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.paused -= 1;
    }
}

/// One vCPU and the thread that runs it (none once it was removed).
struct Slot {
    vcpu: Arc<Mutex<Vcpu>>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// What a vCPU thread needs besides its vCPU.
#[derive(Clone)]
struct Wiring {
    io: Bus,
    mmio: Bus,
    exit: ExitSignal,
}

/// The vCPUs and their threads. vCPUs can be added (hotplug) and removed (after the guest
/// ejected them) while the VM runs; KVM cannot destroy a vCPU, so a removed one keeps its
/// descriptor and is run again if its slot is added back.
pub struct VcpuSet {
    control: Arc<VcpuControl>,
    /// By vCPU index: every vCPU created so far.
    slots: Mutex<Vec<Slot>>,
    wiring: Wiring,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl VcpuSet {
    /// Starts one thread per vCPU (indexes 0..n, in order); with `paused`, they wait for `resume`
    /// before the first run.
    pub fn start(
        vcpus: Vec<Vcpu>,
        io_bus: Bus,
        mmio_bus: Bus,
        exit: ExitSignal,
        paused: bool,
    ) -> Result<VcpuSet, VcpuError> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal)?;
        let control = Arc::new(VcpuControl::new());
        if paused {
            control.lock().requested = Requested::Pause;
        }
        let set = VcpuSet {
            control,
            slots: Mutex::new(Vec::new()),
            wiring: Wiring {
                io: io_bus,
                mmio: mmio_bus,
                exit,
            },
        };
        for vcpu in vcpus {
            set.add(vcpu)?;
        }
        if paused {
            set.pause_within(PAUSE_TIMEOUT)?;
        }
        Ok(set)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        crate::devices::lock(&self.slots)
    }

    /// Runs a new vCPU, whose index must be the next one (every vCPU created before keeps its
    /// slot; a removed one comes back with `readd`).
    pub fn add(&self, vcpu: Vcpu) -> Result<(), VcpuError> {
        let mut slots = self.slots();
        debug_assert_eq!(usize::from(vcpu.index), slots.len());
        let slot = Slot {
            vcpu: Arc::new(Mutex::new(vcpu)),
            thread: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        slots.push(slot);
        let last = slots.len() - 1;
        self.spawn(&mut slots[last])
    }

    /// Runs vCPU `index` again, created before and removed since. False if there is no such
    /// vCPU (it must be created and `add`ed).
    pub fn readd(&self, index: u8) -> Result<bool, VcpuError> {
        let mut slots = self.slots();
        match slots.get_mut(usize::from(index)) {
            Some(slot) if slot.thread.is_none() => {
                slot.stop.store(false, Ordering::SeqCst);
                self.spawn(slot).map(|()| true)
            }
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    fn spawn(&self, slot: &mut Slot) -> Result<(), VcpuError> {
        let (vcpu, control, stop, w) = (
            slot.vcpu.clone(),
            self.control.clone(),
            slot.stop.clone(),
            self.wiring.clone(),
        );
        let index = crate::devices::lock(&vcpu).index;
        let t = crate::seccomp::spawn(Kind::Vcpu, format!("vcpu{index}"), move || {
            run_loop(&vcpu, &control, &stop, &w.io, &w.mmio, &w.exit)
        })
        .map_err(VcpuError::Spawn)?;
        slot.thread = Some(t);
        Ok(())
    }

    /// Stops vCPU `index`'s thread (the guest has ejected it) and waits for it to end.
    pub fn remove(&self, index: u8) -> Result<(), VcpuError> {
        let mut slots = self.slots();
        let Some(slot) = slots.get_mut(usize::from(index)) else {
            return Ok(());
        };
        let Some(thread) = slot.thread.take() else {
            return Ok(());
        };
        slot.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !thread.is_finished() {
            // A parked thread wakes on the condition variable; a running one on the signal
            // (repeated: one sent just before it entered KVM_RUN is lost).
            self.control.changed.notify_all();
            // SAFETY: the pthread id belongs to a thread we own and have not joined.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), SIGRTMIN()) };
            if Instant::now() >= deadline {
                slot.thread = Some(thread);
                return Err(VcpuError::PauseTimeout(PAUSE_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = thread.join();
        Ok(())
    }

    /// Saves every running vCPU, in index order; the vCPUs must be paused. Running vCPUs are
    /// always 0..count (vCPUs are added and removed from the top).
    pub fn save(&self) -> Result<Vec<Versioned<VcpuState>>, MigrationError> {
        self.slots()
            .iter()
            .filter(|s| s.thread.is_some())
            .map(|s| crate::devices::lock(&s.vcpu).snapshot())
            .collect()
    }

    /// vCPUs running (added and not removed).
    pub fn count(&self) -> usize {
        self.slots().iter().filter(|s| s.thread.is_some()).count()
    }

    fn kick_all(&self) {
        for t in self.slots().iter().filter_map(|s| s.thread.as_ref()) {
            // SAFETY: the pthread id belongs to a thread we own and have not joined.
            unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
        }
    }

    fn live(&self) -> usize {
        self.slots()
            .iter()
            .filter_map(|s| s.thread.as_ref())
            .filter(|t| !t.is_finished())
            .count()
    }

    /// Stops every vCPU outside `KVM_RUN`; returns when all have acknowledged.
    fn pause_within(&self, timeout: Duration) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        self.control.lock().requested = Requested::Pause;
        loop {
            let live = self.live();
            let s = self.control.lock();
            if s.paused >= live {
                return Ok(());
            }
            drop(s);
            self.kick_all();
            if Instant::now() >= deadline {
                return Err(VcpuError::PauseTimeout(timeout));
            }
            let s = self.control.lock();
            let _ = self
                .control
                .changed
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn run_all(&self) {
        let mut s = self.control.lock();
        s.requested = Requested::Run;
        self.control.changed.notify_all();
    }
}

/// How long the vCPUs may take to leave `KVM_RUN` before a pause is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The vCPUs pause together: each thread leaves `KVM_RUN` (kicked by a signal) and parks.
impl Pausable for VcpuSet {
    fn pause(&self) -> Result<(), MigrationError> {
        self.pause_within(PAUSE_TIMEOUT)
            .map_err(|e| MigrationError::Pause {
                id: "vcpus".into(),
                reason: e.to_string(),
            })
    }
    fn resume(&self) -> Result<(), MigrationError> {
        self.run_all();
        Ok(())
    }
}

fn run_loop(
    vcpu: &Mutex<Vcpu>,
    control: &VcpuControl,
    stop: &AtomicBool,
    io: &Bus,
    mmio: &Bus,
    exit: &ExitSignal,
) {
    loop {
        control.checkpoint(stop);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut vcpu = crate::devices::lock(vcpu);
        let index = vcpu.index;
        let fatal = match vcpu.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                io.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                io.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel LAPIC; ours has one. Do not spin.
                std::thread::sleep(Duration::from_millis(1));
                None
            }
            Ok(VcpuExit::Shutdown) => Some("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
            Ok(VcpuExit::InternalError) => {
                Some("KVM internal error (emulation failure)".to_string())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(format!(
                "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let reason = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    _ => ExitReason::PowerOff,
                };
                exit.signal(reason);
                return;
            }
            Ok(VcpuExit::Intr) => None,
            Ok(other) => {
                tracing::debug!(vcpu = index, exit = ?other, "unhandled vCPU exit ignored");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(what) = fatal {
            let message = format!("vCPU {}: {what}; {}", vcpu.index, vcpu.describe_registers());
            exit.signal(ExitReason::Failed(message));
            return;
        }
    }
}

/// The complete architectural state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub msrs: Vec<(u32, u64)>,
}

impl State for VcpuState {
    const NAME: &'static str = "vcpu";
    const VERSION: u32 = 1;
}

impl Snapshottable for Vcpu {
    type State = VcpuState;

    fn save(&self) -> Result<VcpuState, MigrationError> {
        let err = |what: &str, e: kvm_ioctls::Error| MigrationError::Save {
            id: format!("vcpu{}", self.index),
            reason: format!("{what}: {e}"),
        };
        let msrs = msr::get_msrs_tolerant(&self.fd, &msr::state_msr_indices())
            .map_err(|e| err("MSRs", e))?;
        Ok(VcpuState {
            regs: self.fd.get_regs().map_err(|e| err("regs", e))?,
            sregs: self.fd.get_sregs().map_err(|e| err("sregs", e))?,
            xsave: self.fd.get_xsave().map_err(|e| err("XSAVE", e))?,
            lapic: self.fd.get_lapic().map_err(|e| err("LAPIC", e))?,
            mp_state: self.fd.get_mp_state().map_err(|e| err("MP state", e))?,
            events: self.fd.get_vcpu_events().map_err(|e| err("events", e))?,
            xcrs: self.fd.get_xcrs().map_err(|e| err("XCRs", e))?,
            debugregs: self.fd.get_debug_regs().map_err(|e| err("debug regs", e))?,
            msrs,
        })
    }

    fn restore(&mut self, s: VcpuState) -> Result<(), MigrationError> {
        let id = format!("vcpu{}", self.index);
        let err = |what: &str, e: kvm_ioctls::Error| MigrationError::Restore {
            id: id.clone(),
            reason: format!("{what}: {e}"),
        };
        self.fd.set_sregs(&s.sregs).map_err(|e| err("sregs", e))?;
        self.fd.set_regs(&s.regs).map_err(|e| err("regs", e))?;
        // SAFETY: the buffer is a kvm_xsave read from KVM by `save`, of the size KVM_SET_XSAVE expects.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(|e| err("XSAVE", e))?;
        self.fd.set_xcrs(&s.xcrs).map_err(|e| err("XCRs", e))?;
        self.fd.set_lapic(&s.lapic).map_err(|e| err("LAPIC", e))?;
        let entries: Vec<_> = s
            .msrs
            .iter()
            .map(|(index, data)| kvm_bindings::kvm_msr_entry {
                index: *index,
                data: *data,
                ..Default::default()
            })
            .collect();
        msr::set_msrs_tolerant(&self.fd, &entries);
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(|e| err("debug regs", e))?;
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(|e| err("MP state", e))?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(|e| err("events", e))?;
        Ok(())
    }
}
