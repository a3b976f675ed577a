//! Seccomp filters per thread kind (`filters`), installed by each thread before it runs guest
//! code or serves a request. A call outside a thread's list raises SIGSYS; the handler here names
//! the thread and the call on stderr and ends the VMM (exit status [`EXIT_CODE`]).
//!
//! [`enable`] is called once, by `vmm run` and `vmm restore` (unless `--no-seccomp`), before any
//! thread starts; [`spawn`] starts every VMM thread under its kind's filter.

mod filters;
mod syscalls;

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// The exit status of a VMM that made a forbidden call.
pub use vmm_api::SECCOMP_EXIT as EXIT_CODE;

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The main thread and its helpers (migration, lease, console input, statistics).
    Vmm,
    Vcpu,
    /// A virtio device's queue worker.
    Device,
    /// The API socket's threads.
    Api,
    /// The thread that starts device workers (so a vCPU needs no right to start threads).
    Spawner,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Vmm,
        Kind::Vcpu,
        Kind::Device,
        Kind::Api,
        Kind::Spawner,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vmm => "vmm",
            Kind::Vcpu => "vcpu",
            Kind::Device => "device",
            Kind::Api => "api",
            Kind::Spawner => "spawner",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("no thread kind {s:?} (vmm, vcpu, device, api, spawner)"))
    }
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("seccomp filter for {0} threads: unknown system call {1}")]
    UnknownSyscall(&'static str, &'static str),
    #[error("seccomp filter for {0} threads: {1}")]
    Build(&'static str, seccompiler::BackendError),
    #[error("cannot install the seccomp filter for {0} threads: {1}")]
    Install(&'static str, seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot start the device thread spawner: {0}")]
    Spawner(std::io::Error),
}

/// What [`enable`] set up: the compiled filters and the spawner of device threads.
struct Enabled {
    programs: Vec<(Kind, BpfProgram)>,
    /// Answers `clone3` with ENOSYS (stacked on the allow list, the stricter answer wins).
    no_clone3: BpfProgram,
    spawner: Mutex<Sender<Job>>,
    /// Test hook (`vmm run --seccomp-selftest KIND`): that kind's first thread makes a forbidden
    /// call right after installing its filter.
    selftest: Option<Kind>,
}

type Job = Box<dyn FnOnce() + Send>;

/// glibc malloc arenas, at most (`enable`).
const MALLOC_ARENAS: libc::c_int = 4;

static ENABLED: OnceLock<Enabled> = OnceLock::new();

/// Compiles every filter, installs the SIGSYS handler and starts the spawner. Threads started
/// by [`spawn`] from now on, and the main thread at [`apply`], are filtered.
pub fn enable(selftest: Option<Kind>) -> Result<(), SeccompError> {
    let programs = Kind::ALL
        .into_iter()
        .map(|k| compile(k).map(|p| (k, p)))
        .collect::<Result<_, _>>()?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| SeccompError::Build("all", e))?;
    // glibc sizes its malloc arenas by the CPU count, read from /sys the first time a thread
    // needs an arena beyond the eighth: from whichever thread that is, under its filter. A fixed
    // maximum means it never looks (and a VMM's few threads need no more).
    // SAFETY: mallopt only sets a malloc parameter; no thread has started yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
    install_handler()?;
    let (tx, rx) = channel::<Job>();
    if ENABLED
        .set(Enabled {
            programs,
            no_clone3,
            spawner: Mutex::new(tx),
            selftest,
        })
        .is_err()
    {
        return Ok(());
    }
    // Started here, before any filter: its own is the spawner's.
    spawn(Kind::Spawner, "spawner".into(), move || {
        for job in rx {
            job();
        }
    })
    .map_err(SeccompError::Spawner)?;
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (nothing unless [`enable`]d).
pub fn apply(kind: Kind) -> Result<(), SeccompError> {
    let Some(e) = ENABLED.get() else {
        return Ok(());
    };
    let Some((_, program)) = e.programs.iter().find(|(k, _)| *k == kind) else {
        return Ok(());
    };
    KIND.with(|k| k.set(Some(kind)));
    let creates_threads = matches!(kind, Kind::Vmm | Kind::Api | Kind::Spawner);
    if creates_threads {
        seccompiler::apply_filter(&e.no_clone3).map_err(|err| SeccompError::Install("all", err))?;
    }
    seccompiler::apply_filter(program).map_err(|err| SeccompError::Install(kind.name(), err))?;
    if e.selftest == Some(kind) {
        tracing::warn!(kind = kind.name(), "seccomp self-test: calling execve");
        // SAFETY: execve with null arguments: refused by the filter, or EFAULT if it let it by.
        unsafe { libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize) };
    }
    Ok(())
}

/// Starts a named thread of `kind`, which installs its filter before running `f`. Device
/// threads are started by the spawner thread (see `filters`). A thread that cannot install its
/// filter ends the VMM: it would run unconfined.
pub fn spawn<T: Send + 'static>(
    kind: Kind,
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let body = move || {
        if let Err(e) = apply(kind) {
            tracing::error!(error = %e, "the VMM stops: a thread would run without its filter");
            eprintln!("vmm: {e}");
            std::process::exit(1);
        }
        f()
    };
    let spawner = ENABLED
        .get()
        .filter(|_| kind == Kind::Device)
        .map(|e| crate::devices::lock(&e.spawner).clone());
    let Some(spawner) = spawner else {
        return std::thread::Builder::new().name(name).spawn(body);
    };
    let (tx, rx) = channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(std::thread::Builder::new().name(name).spawn(body));
    });
    let gone = || std::io::Error::other("the device thread spawner has stopped");
    spawner.send(job).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// The BPF program of `kind`: its lists merged per system call (any rule without conditions
/// allows every use), everything else trapped.
fn compile(kind: Kind) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for allow in filters::allowed(kind).into_iter().flatten() {
        let (name, only) = match allow {
            filters::Allow::Any(n) => (*n, None),
            filters::Allow::Only(n, arg, values) => (*n, Some((*arg, *values))),
        };
        let nr = number(name).ok_or(SeccompError::UnknownSyscall(kind.name(), name))?;
        let entry = rules.entry(nr).or_insert_with(|| Some(Vec::new()));
        match (only, entry.as_mut()) {
            (None, _) => *entry = None,
            (Some(_), None) => {}
            (Some((arg, values)), Some(list)) => {
                for v in values {
                    let cond =
                        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                            .and_then(|c| SeccompRule::new(vec![c]))
                            .map_err(|e| SeccompError::Build(kind.name(), e))?;
                    list.push(cond);
                }
            }
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| SeccompError::Build(kind.name(), e))
}

fn number(name: &str) -> Option<i64> {
    syscalls::SYSCALLS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, nr)| *nr)
}

fn name_of(nr: i64) -> &'static str {
    syscalls::SYSCALLS
        .iter()
        .find(|(_, n)| *n == nr)
        .map_or("unknown", |(name, _)| name)
}

thread_local! {
    /// The filter the thread installed itself, for the SIGSYS handler (which must not allocate or
    /// lock); `None` in a thread that only inherited its creator's.
    static KIND: std::cell::Cell<Option<Kind>> = const { std::cell::Cell::new(None) };
}

fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only formats into a stack buffer, writes
    // it with write(2) and calls _exit, which are async-signal-safe.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A small, allocation-free line buffer for the handler.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS its union holds the call address (a
    // pointer) and then the system call number (an int): the seventh int of the structure.
    let nr = unsafe { *(info as *const i32).add(6) };
    let kind = KIND.with(|k| k.get());
    // The kernel's name of the thread (what `std::thread::Builder::name` set), which threads
    // that inherited their filter have too.
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer, which has 17.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let mut name_len = name.iter().position(|b| *b == 0).unwrap_or(16);
    // SAFETY: gettid and getpid have no arguments and cannot fail.
    if unsafe { libc::gettid() == libc::getpid() } {
        // The main thread's kernel name is the program's.
        name[..4].copy_from_slice(b"main");
        name_len = 4;
    }
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"vmm: seccomp: thread ");
    line.push(&name[..name_len]);
    line.push(b" (");
    line.push(kind.map_or("inherited", Kind::name).as_bytes());
    line.push(b" filter) made the forbidden system call ");
    line.push(name_of(i64::from(nr)).as_bytes());
    line.push(b" (");
    line.push_number(nr as u64);
    line.push(b"); the VMM stops\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives on this stack.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_names_only_known_calls() {
        for k in Kind::ALL {
            let p = compile(k).unwrap_or_else(|e| panic!("{}: {e}", k.name()));
            assert!(!p.is_empty());
        }
    }

    #[test]
    fn names_and_numbers_agree_with_libc() {
        assert_eq!(number("read"), Some(libc::SYS_read));
        assert_eq!(number("clone3"), Some(libc::SYS_clone3));
        assert_eq!(number("ioctl"), Some(libc::SYS_ioctl));
        assert_eq!(name_of(libc::SYS_execve), "execve");
        assert_eq!(name_of(100_000), "unknown");
    }

    #[test]
    fn a_vcpu_may_neither_open_files_nor_start_threads_nor_run_programs() {
        let names: Vec<&str> = filters::allowed(Kind::Vcpu)
            .into_iter()
            .flatten()
            .map(|a| match a {
                filters::Allow::Any(n) | filters::Allow::Only(n, _, _) => *n,
            })
            .collect();
        for forbidden in ["openat", "clone", "clone3", "execve", "socket", "connect"] {
            assert!(!names.contains(&forbidden), "{forbidden}");
        }
    }

    #[test]
    fn the_exit_code_is_the_one_a_shell_gives_sigsys() {
        assert_eq!(EXIT_CODE, 128 + libc::SIGSYS);
    }

    #[test]
    fn kinds_parse_by_name() {
        for k in Kind::ALL {
            assert_eq!(k.name().parse::<Kind>(), Ok(k));
        }
        assert!("gpu".parse::<Kind>().is_err());
    }
}
