//! What each kind of VMM thread may ask of the kernel, as data: system calls by name, some only
//! with given argument values. Everything else is trapped (`super`), so a guest that takes over
//! a thread through a device bug cannot open files, run programs or reach the network.
//!
//! Threads inherit their creator's filter and add their own; the kernel applies every filter a
//! thread has. So the main thread's list also covers what the threads it starts do before they
//! add theirs (a vCPU thread starts under the main thread's filter), and device threads are
//! started by a thread of their own (`Kind::Spawner`), not by the vCPU that activates a device.

use super::Kind;

/// One allowed system call.
pub(super) enum Allow {
    /// With any arguments.
    Any(&'static str),
    /// Only when argument `arg` is one of `values` (compared as 32-bit values).
    Only(&'static str, u8, &'static [u64]),
}
use Allow::{Any, Only};

const PR_SET_NAME: u64 = 15;
const PR_GET_NAME: u64 = 16;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const AF_UNIX: u64 = 1;

/// `clone` flags of glibc's `pthread_create`: a thread, never a new process.
pub(super) const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const FIONBIO: u64 = 0x5421;

/// Every thread: memory, locks, time, signals, its own start and end, logging.
const BASE: &[Allow] = &[
    Any("brk"),
    Any("mmap"),
    Any("munmap"),
    Any("mremap"),
    Any("mprotect"),
    Any("madvise"),
    Any("futex"),
    Any("clock_gettime"),
    Any("clock_nanosleep"),
    Any("nanosleep"),
    Any("sched_yield"),
    Any("sched_getaffinity"),
    Any("gettid"),
    Any("getpid"),
    Any("tgkill"),
    Any("rt_sigprocmask"),
    Any("rt_sigreturn"),
    Any("sigaltstack"),
    Any("restart_syscall"),
    Any("rseq"),
    Any("set_robust_list"),
    Any("write"),
    Any("close"),
    Any("getrandom"),
    Any("exit"),
    Any("exit_group"),
    // Naming the thread; the SIGSYS handler reads the name back.
    Only("prctl", 0, &[PR_SET_NAME, PR_GET_NAME]),
];

/// Starting threads (`clone3` is answered ENOSYS so glibc uses `clone`, whose flags a filter can
/// see), and the new threads adding their own filter.
const THREADS: &[Allow] = &[
    Any("clone3"),
    Only("clone", 0, &[THREAD_CLONE_FLAGS]),
    Only("prctl", 0, &[PR_SET_NO_NEW_PRIVS]),
    Only("seccomp", 0, &[SECCOMP_SET_MODE_FILTER]),
];

/// A vCPU: runs the guest and emulates its MMIO and port I/O, which includes activating a
/// virtio device (eventfds, an epoll, a tap's offloads; its thread comes from the spawner).
const VCPU: &[Allow] = &[
    Only(
        "ioctl",
        1,
        &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, TUNSETOFFLOAD],
    ),
    Any("eventfd2"),
    Any("epoll_create1"),
    Any("epoll_ctl"),
    Any("fcntl"),
    Any("read"),
    // The balloon's statistics timer (`--balloon-stats-ms`).
    Any("timerfd_create"),
    Any("timerfd_settime"),
];

/// A virtio device's queue worker: its backend (a disk, a tap, vsock's Unix sockets, the
/// host's entropy) and its epoll loop.
const DEVICE: &[Allow] = &[
    Any("epoll_wait"),
    Any("epoll_pwait"),
    Any("epoll_ctl"),
    Any("read"),
    Any("readv"),
    Any("writev"),
    Any("pread64"),
    Any("pwrite64"),
    Any("preadv"),
    Any("pwritev"),
    Any("preadv2"),
    Any("pwritev2"),
    Any("fsync"),
    Any("fdatasync"),
    Any("lseek"),
    Any("fcntl"),
    Only("socket", 0, &[AF_UNIX]),
    Any("connect"),
    Any("accept4"),
    Any("recvfrom"),
    Any("sendto"),
    Any("recvmsg"),
    Any("sendmsg"),
    Any("shutdown"),
    Any("getsockopt"),
    Only("ioctl", 1, &[FIONBIO]),
];

/// The API: accepts connections on the socket bound at start, one thread each.
const API: &[Allow] = &[
    Any("accept4"),
    Any("read"),
    Any("recvfrom"),
    Any("sendto"),
    Any("fcntl"),
];

/// The main thread and its helpers (migration, lease, console input, balloon statistics):
/// KVM itself (creating vCPUs, saving and restoring state), snapshot and migration files in the
/// directories it is given, the event loop. No new processes, no sockets but Unix ones.
const VMM: &[Allow] = &[
    Any("ioctl"),
    Any("openat"),
    Any("read"),
    Any("readv"),
    Any("writev"),
    Any("pread64"),
    Any("pwrite64"),
    Any("lseek"),
    Any("fsync"),
    Any("fdatasync"),
    Any("ftruncate"),
    Any("fallocate"),
    // Checkpoints copy disks in the kernel (a reflink where the filesystem can).
    Any("copy_file_range"),
    Any("newfstatat"),
    Any("fstat"),
    Any("statx"),
    Any("getdents64"),
    // Resolving the directories API requests name (`state_roots`).
    Any("readlink"),
    Any("readlinkat"),
    Any("getcwd"),
    Any("mkdir"),
    Any("mkdirat"),
    Any("rename"),
    Any("renameat"),
    Any("renameat2"),
    Any("unlink"),
    Any("unlinkat"),
    Any("mincore"),
    Any("fcntl"),
    Any("eventfd2"),
    Any("timerfd_create"),
    Any("timerfd_settime"),
    Any("epoll_create1"),
    Any("epoll_ctl"),
    Any("epoll_wait"),
    Any("poll"),
    Any("ppoll"),
    Only("socket", 0, &[AF_UNIX]),
    Any("connect"),
    Any("bind"),
    Any("listen"),
    Any("accept4"),
    Any("recvfrom"),
    Any("sendto"),
    Any("rt_sigaction"),
];

/// The lists a thread of `kind` is allowed, together.
pub(super) fn allowed(kind: Kind) -> Vec<&'static [Allow]> {
    match kind {
        Kind::Vmm => vec![BASE, THREADS, VMM],
        Kind::Vcpu => vec![BASE, VCPU],
        Kind::Device => vec![BASE, DEVICE],
        Kind::Spawner => vec![BASE, THREADS, DEVICE],
        Kind::Api => vec![BASE, THREADS, API],
    }
}
