//! The jail every VMM runs in (docs/sandbox.md), after Firecracker's jailer: the agent starts
//! the VMM as root and, between fork and exec, the child
//! 1. joins the VM's cgroup(s) (`cgroup.rs`), so its limits hold from the first instruction;
//! 2. enters a mount namespace of its own whose root is an empty tmpfs holding only what this
//!    VM needs, each bound at the path the VMM is given: its kernel, initrd and disk, its
//!    directory on shared storage, its API socket's directory, the host's lease, the vmm binary
//!    and the system's shared libraries (read-only), and device nodes made for it alone
//!    (`/dev/kvm`, `/dev/net/tun`);
//! 3. drops every capability and becomes the VMM user (`vim-vmm`, made by the package).
//!
//! The tap is made by the agent, owned by the VMM user, so the VMM attaches to it without
//! CAP_NET_ADMIN. Files the VMM writes (its directory, its disk) are chowned to the VMM user
//! before it starts, as libvirt does for QEMU.
//!
//! The child runs only system calls between fork and exec (no allocation: the agent is
//! multi-threaded); everything is computed before the fork, in `Plan::compile`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cgroup::Hierarchy;

/// The system's shared libraries, which the (dynamically linked) vmm needs to start.
const LIBRARY_DIRS: [&str; 4] = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

/// How this host's VMMs are jailed.
#[derive(Debug)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    pub cgroups: Hierarchy,
    /// Where each VM's jail root is mounted (in its namespace only): `state/jail/VM`.
    roots: PathBuf,
}

/// The user a VMM runs as: a user name, or `UID:GID` (hosts without the user in their
/// password database, like the nested lane's L1).
pub fn resolve_user(spec: &str) -> Result<(u32, u32)> {
    if let Some((u, g)) = spec.split_once(':') {
        let uid: u32 = u
            .parse()
            .with_context(|| format!("--vmm-user {spec}: bad uid"))?;
        let gid: u32 = g
            .parse()
            .with_context(|| format!("--vmm-user {spec}: bad gid"))?;
        anyhow::ensure!(uid != 0 && gid != 0, "--vmm-user {spec}: not root");
        return Ok((uid, gid));
    }
    let user = nix::unistd::User::from_name(spec)
        .with_context(|| format!("cannot look up user {spec}"))?
        .with_context(|| {
            format!(
                "the VMM user {spec} does not exist: create it (the fleet-agent package does; \
                 scripts/setup.sh too), name another with --vmm-user, or run VMMs as root \
                 and unconfined with --no-jail"
            )
        })?;
    anyhow::ensure!(!user.uid.is_root(), "--vmm-user {spec}: not root");
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// What one VMM may see.
#[derive(Debug, Default)]
pub struct Plan {
    /// Bound read-only: the vmm binary, kernel, initrd, the lease's directory.
    pub read_only: Vec<PathBuf>,
    /// Bound writable (no exec): the VM's directory, its disk, its API socket's directory.
    pub writable: Vec<PathBuf>,
    /// Whether the VM has a NIC (`/dev/net/tun`).
    pub net: bool,
    /// Whether the vmm is dynamically linked: then the library directories and the loader's
    /// cache are bound too (read-only). The vmm as shipped is static (`scripts/build-vmm.sh`).
    pub libraries: bool,
}

/// Whether the program at `path` asks for a dynamic loader (an ELF `PT_INTERP` program header).
/// Anything unreadable or not a 64-bit little-endian ELF counts as dynamic: the jail then binds
/// the libraries, which is only more than a static program needs.
pub fn dynamically_linked(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let interp = || -> std::io::Result<bool> {
        let mut f = std::fs::File::open(path)?;
        let mut h = [0u8; 64];
        f.read_exact(&mut h)?;
        if h[..4] != *b"\x7fELF" || h[4] != 2 || h[5] != 1 {
            return Ok(true);
        }
        let u16_at = |i: usize| u64::from(u16::from_le_bytes([h[i], h[i + 1]]));
        let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap_or_default());
        let (phentsize, phnum) = (u16_at(54), u16_at(56));
        if phentsize < 4 || phnum > 256 {
            return Ok(true);
        }
        let mut table = vec![0u8; (phentsize * phnum) as usize];
        f.seek(SeekFrom::Start(phoff))?;
        f.read_exact(&mut table)?;
        Ok(table
            .chunks(phentsize as usize)
            .any(|e| u32::from_le_bytes([e[0], e[1], e[2], e[3]]) == PT_INTERP))
    };
    interp().unwrap_or(true)
}

/// One step of the child's set-up, on paths under the jail's root.
#[derive(Debug, PartialEq)]
enum Op {
    Mkdir(CString),
    /// A file to bind a file onto.
    Touch(CString),
    Bind {
        src: CString,
        dst: CString,
        flags: libc::c_ulong,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Mknod {
        path: CString,
        rdev: libc::dev_t,
    },
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{} has a NUL", p.display()))
}

/// `p` (absolute) under `root`.
fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

impl Jail {
    pub fn new(uid: u32, gid: u32, cgroups: Hierarchy, state_dir: &Path) -> Result<Jail> {
        let roots = state_dir.join("jail");
        std::fs::create_dir_all(&roots)?;
        // A VM this agent ever started a VMM for has its log here.
        cgroups.prune(|id| crate::vms::vmm_log_path(state_dir, id).exists());
        Ok(Jail {
            uid,
            gid,
            cgroups,
            roots,
        })
    }

    /// Gives `path` (and, for a directory, everything in it) to the VMM user.
    pub fn own(&self, path: &Path) -> Result<()> {
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot give {} to the VMM user", path.display()))?;
        if meta.uid() != self.uid || meta.gid() != self.gid {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
                .with_context(|| format!("cannot give {} to the VMM user", path.display()))?;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(path)? {
                self.own(&e?.path())?;
            }
        }
        Ok(())
    }

    /// Lets the VMM user read `path` (a kernel or initrd, often shared by many VMs): through
    /// its group, given read access, when neither its owner, group nor others' bits allow it.
    pub fn let_read(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot let the VMM user read {}", path.display()))?;
        let mode = meta.mode();
        let readable = mode & 0o004 != 0
            || (meta.uid() == self.uid && mode & 0o400 != 0)
            || (meta.gid() == self.gid && mode & 0o040 != 0);
        if !readable {
            std::os::unix::fs::chown(path, None, Some(self.gid))
                .and_then(|_| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o040))
                })
                .with_context(|| format!("cannot let the VMM user read {}", path.display()))?;
        }
        Ok(())
    }

    /// Makes `cmd` (the vmm) start jailed as `plan` says, in VM `id`'s cgroup sized for
    /// `vcpus` and `memory_mib`.
    pub fn confine(
        &self,
        cmd: &mut Command,
        id: &str,
        plan: &Plan,
        (vcpus, memory_mib): (u32, u64),
    ) -> Result<()> {
        let root = self.roots.join(id);
        std::fs::create_dir_all(&root)?;
        let procs = self
            .cgroups
            .create(id, vcpus, memory_mib)?
            .iter()
            .map(|p| cstr(p))
            .collect::<Result<Vec<_>>>()?;
        let ops = plan.compile(&root)?;
        let child = Child {
            root: cstr(&root)?,
            procs,
            ops,
            uid: self.uid,
            gid: self.gid,
        };
        // SAFETY: the closure runs in the forked child before exec and makes only system calls
        // on data prepared here (no allocation, no locks).
        unsafe { cmd.pre_exec(move || child.enter()) };
        Ok(())
    }

    /// Removes what VM `id`'s jail left on the host (its VMM has exited).
    pub fn remove(&self, id: &str) {
        self.cgroups.remove(id);
        let _ = std::fs::remove_dir(self.roots.join(id));
    }
}

impl Plan {
    /// The child's steps, with every path under `root`.
    fn compile(&self, root: &Path) -> Result<Vec<Op>> {
        const RO: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        const RW: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let mut entries: Vec<(PathBuf, libc::c_ulong)> = Vec::new();
        let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
        let libraries = if self.libraries {
            &LIBRARY_DIRS[..]
        } else {
            &[]
        };
        for d in libraries.iter().map(Path::new) {
            match std::fs::symlink_metadata(d) {
                Ok(m) if m.file_type().is_symlink() => links.push((d.into(), d.read_link()?)),
                Ok(m) if m.is_dir() => entries.push((d.into(), RO)),
                _ => {}
            }
        }
        if self.libraries && Path::new("/etc/ld.so.cache").is_file() {
            entries.push(("/etc/ld.so.cache".into(), RO));
        }
        entries.extend(self.read_only.iter().map(|p| (p.clone(), RO)));
        entries.extend(self.writable.iter().map(|p| (p.clone(), RW)));
        for (p, _) in &entries {
            anyhow::ensure!(
                p.is_absolute() && !p.components().any(|c| c.as_os_str() == ".."),
                "the jail binds only absolute paths: {}",
                p.display()
            );
        }
        // Outer directories first; a path inside one already bound (or behind a library
        // link) is reachable through it.
        entries.sort_by_key(|(p, _)| p.components().count());
        let mut kept: Vec<(PathBuf, libc::c_ulong)> = Vec::new();
        for (p, flags) in entries {
            let covered = kept.iter().any(|(k, _)| p.starts_with(k))
                || links.iter().any(|(l, _)| p.starts_with(l));
            if !covered {
                kept.push((p, flags));
            }
        }
        let mut ops = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        let mut mkdirs = |ops: &mut Vec<Op>, p: &Path| -> Result<()> {
            let mut at = PathBuf::from("/");
            for c in p.components().skip(1) {
                at.push(c);
                if !made.contains(&at) {
                    ops.push(Op::Mkdir(cstr(&under(root, &at))?));
                    made.push(at.clone());
                }
            }
            Ok(())
        };
        for (link, target) in &links {
            if let Some(parent) = link.parent() {
                mkdirs(&mut ops, parent)?;
            }
            ops.push(Op::Symlink {
                target: cstr(target)?,
                link: cstr(&under(root, link))?,
            });
        }
        for (p, flags) in &kept {
            let meta = std::fs::metadata(p)
                .with_context(|| format!("the VMM needs {}, which cannot be read", p.display()))?;
            if meta.is_dir() {
                mkdirs(&mut ops, p)?;
            } else {
                if let Some(parent) = p.parent() {
                    mkdirs(&mut ops, parent)?;
                }
                ops.push(Op::Touch(cstr(&under(root, p))?));
            }
            ops.push(Op::Bind {
                src: cstr(p)?,
                dst: cstr(&under(root, p))?,
                flags: *flags,
            });
        }
        let mut devices = vec![Path::new("/dev/kvm")];
        if self.net {
            devices.push(Path::new("/dev/net/tun"));
        }
        for d in devices {
            let meta = std::fs::metadata(d).with_context(|| format!("no {}", d.display()))?;
            if let Some(parent) = d.parent() {
                mkdirs(&mut ops, parent)?;
            }
            ops.push(Op::Mknod {
                path: cstr(&under(root, d))?,
                rdev: meta.rdev(),
            });
        }
        Ok(ops)
    }
}

/// What the forked child does before exec.
struct Child {
    root: CString,
    procs: Vec<CString>,
    ops: Vec<Op>,
    uid: u32,
    gid: u32,
}

/// A failed step: one line on the VMM's log (stderr) without allocating, and the errno.
fn fail(step: &str, path: &CString) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    let code = err.raw_os_error().unwrap_or(0);
    let mut digits = [0u8; 12];
    let mut n = code.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for part in [
        b"vim-agent: jail: cannot ".as_slice(),
        step.as_bytes(),
        b" ",
        path.as_bytes(),
        b": errno ",
        &digits[i..],
        b"\n",
    ] {
        // SAFETY: write(2) of a buffer we own to stderr.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    err
}

fn check(r: libc::c_int, step: &str, path: &CString) -> std::io::Result<()> {
    if r < 0 {
        Err(fail(step, path))
    } else {
        Ok(())
    }
}

impl Child {
    /// Runs in the forked child: only system calls on prepared data.
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY (the whole function): system calls on NUL-terminated strings owned by `self`,
        // in a single-threaded child about to exec.
        unsafe {
            for p in &self.procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd, "open", p)?;
                let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                check(r as libc::c_int, "join cgroup", p)?;
            }
            check(
                libc::unshare(libc::CLONE_NEWNS),
                "unshare the mount namespace of",
                &self.root,
            )?;
            let slash = c"/";
            check(
                libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                "make private",
                &self.root,
            )?;
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID,
                    c"mode=0755,size=1m".as_ptr().cast(),
                ),
                "mount a tmpfs on",
                &self.root,
            )?;
            // The jail's directories must be searchable by the VMM user.
            let umask = libc::umask(0o022);
            for op in &self.ops {
                self.step(op)?;
            }
            libc::umask(umask);
            check(libc::chdir(self.root.as_ptr()), "enter", &self.root)?;
            let dot = c".";
            if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0 {
                // The host's tree was stacked under the new root: gone from this namespace.
                check(
                    libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
                    "detach the host from",
                    &self.root,
                )?;
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                // A host running from its initramfs (rootfs cannot be pivoted away, like the
                // nested lane's L1): the jail's root is moved over `/` and made the root, as
                // switch_root does. The host's tree stays below it, out of reach of a process
                // without CAP_SYS_ADMIN or CAP_SYS_CHROOT (which the VMM will not have).
                check(
                    libc::mount(
                        dot.as_ptr(),
                        slash.as_ptr(),
                        std::ptr::null(),
                        libc::MS_MOVE,
                        std::ptr::null(),
                    ),
                    "move over / the jail",
                    &self.root,
                )?;
                check(libc::chroot(dot.as_ptr()), "chroot to", &self.root)?;
            } else {
                return Err(fail("pivot to", &self.root));
            }
            check(libc::chdir(slash.as_ptr()), "enter", &self.root)?;
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            check(
                libc::setgroups(0, std::ptr::null()),
                "drop the groups of",
                &self.root,
            )?;
            check(
                libc::setresgid(self.gid, self.gid, self.gid),
                "set the group in",
                &self.root,
            )?;
            // From root to another user: every capability goes.
            check(
                libc::setresuid(self.uid, self.uid, self.uid),
                "set the user in",
                &self.root,
            )?;
        }
        Ok(())
    }

    /// # Safety
    /// Called from `enter` only.
    unsafe fn step(&self, op: &Op) -> std::io::Result<()> {
        match op {
            Op::Mkdir(p) => {
                if libc::mkdir(p.as_ptr(), 0o755) < 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(fail("mkdir", p));
                }
            }
            Op::Touch(p) => {
                let fd = libc::open(
                    p.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o600,
                );
                check(fd, "create", p)?;
                libc::close(fd);
            }
            Op::Bind { src, dst, flags } => {
                check(
                    libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ),
                    "bind",
                    src,
                )?;
                check(
                    libc::mount(
                        std::ptr::null(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | flags,
                        std::ptr::null(),
                    ),
                    "restrict",
                    src,
                )?;
            }
            Op::Symlink { target, link } => {
                check(libc::symlink(target.as_ptr(), link.as_ptr()), "link", link)?;
            }
            Op::Mknod { path, rdev } => {
                check(
                    libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *rdev),
                    "make",
                    path,
                )?;
                check(
                    libc::chown(path.as_ptr(), self.uid, self.gid),
                    "chown",
                    path,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_by_name_or_number() {
        assert_eq!(resolve_user("64000:64001").unwrap(), (64000, 64001));
        assert!(resolve_user("0:0").is_err());
        assert!(resolve_user("x:1").is_err());
        assert!(resolve_user("root").is_err());
        let e = resolve_user("no-such-user-here").unwrap_err().to_string();
        assert!(e.contains("--no-jail"), "{e}");
    }

    #[test]
    fn the_plan_binds_each_path_once_at_its_own_place() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("shared/vms/vm1");
        std::fs::create_dir_all(&vm).unwrap();
        let disk = vm.join("disk.img");
        std::fs::write(&disk, b"").unwrap();
        let kernel = t.path().join("images/vmlinux");
        std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
        std::fs::write(&kernel, b"").unwrap();
        let plan = Plan {
            read_only: vec![kernel.clone()],
            writable: vec![disk.clone(), vm.clone()],
            net: true,
            libraries: true,
        };
        let root = Path::new("/jr");
        let ops = plan.compile(root).unwrap();
        let binds: Vec<&CString> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Bind { src, .. } => Some(src),
                _ => None,
            })
            .collect();
        // The disk is inside the VM's directory: reachable through it, not bound again.
        assert!(binds.contains(&&cstr(&vm).unwrap()));
        assert!(binds.contains(&&cstr(&kernel).unwrap()));
        assert!(!binds.contains(&&cstr(&disk).unwrap()));
        let lib = |ops: &[Op]| {
            ops.iter().any(|o| matches!(o, Op::Bind { src, .. } if src.as_bytes().starts_with(b"/usr/lib") || src.as_bytes().starts_with(b"/lib")))
        };
        assert!(lib(&ops) || !Path::new("/lib").exists());
        let static_vmm = Plan {
            read_only: vec![kernel.clone()],
            writable: vec![vm.clone()],
            ..Plan::default()
        };
        assert!(!lib(&static_vmm.compile(root).unwrap()));
        assert!(ops.contains(&Op::Touch(cstr(&under(root, &kernel)).unwrap())));
        assert!(ops.contains(&Op::Mkdir(cstr(&under(root, &vm)).unwrap())));
        let kvm = std::fs::metadata("/dev/kvm").map(|m| m.rdev());
        if let Ok(rdev) = kvm {
            assert!(ops.contains(&Op::Mknod {
                path: cstr(Path::new("/jr/dev/kvm")).unwrap(),
                rdev
            }));
        }
        // Each directory is made once, before what goes in it.
        let mkdirs: Vec<&CString> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Mkdir(p) => Some(p),
                _ => None,
            })
            .collect();
        let mut unique = mkdirs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), mkdirs.len());
        let bad = Plan {
            writable: vec!["relative/x".into()],
            ..Plan::default()
        };
        assert!(bad.compile(root).is_err());
    }

    /// The shipped vmm is static (no loader), this test binary is not; a non-ELF file counts
    /// as dynamic.
    #[test]
    fn a_static_program_needs_no_libraries() {
        assert!(dynamically_linked(&std::env::current_exe().unwrap()));
        let t = tempfile::tempdir().unwrap();
        let text = t.path().join("script");
        std::fs::write(&text, b"#!/bin/sh\n").unwrap();
        assert!(dynamically_linked(&text));
        let busybox = Path::new("/bin/busybox");
        if busybox.exists() {
            // Debian's busybox-static, which the test machines install.
            assert!(!dynamically_linked(busybox));
        }
    }
}
