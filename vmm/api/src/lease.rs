//! The host's lease, as the agent hands it to its VMMs: a file holding the instant (on the
//! host's `CLOCK_MONOTONIC`, in nanoseconds, after the boot id that clock belongs to) until which
//! the agent's lease with the VIM holds, or `none` when the host holds no lease. A VMM started with `--lease FILE` stops its guest the
//! moment that instant passes — so a host cut off from the queue, or whose agent hangs or dies,
//! stops its VMs by itself before the VIM restarts them elsewhere (docs/failover.md).

use std::path::Path;

/// What the lease file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The host holds no lease (the VIM runs no failover): nothing to enforce.
    None,
    /// The lease holds until this `CLOCK_MONOTONIC` instant, in nanoseconds.
    Until(u64),
}

impl Lease {
    /// Whether the lease has lapsed at `now` (nanoseconds on `CLOCK_MONOTONIC`).
    pub fn lapsed_at(self, now: u64) -> bool {
        match self {
            Lease::None => false,
            Lease::Until(t) => now >= t,
        }
    }
}

/// Exit status of a VMM that fenced itself (its lease lapsed).
pub const FENCED_EXIT: i32 = 3;

/// `CLOCK_MONOTONIC` now, in nanoseconds: one clock for every process of the host.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into our own timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// This boot's id: `CLOCK_MONOTONIC` starts again at each boot, so an instant from another boot
/// means nothing.
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Reads the lease file. A file that cannot be read or parsed, or that was written in another
/// boot, is an error: the VMM treats it as a lapsed lease (it fails safe).
pub fn read(path: &Path) -> std::io::Result<Lease> {
    let text = std::fs::read_to_string(path)?;
    let bad = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {why}: {:?}", path.display(), text.trim()),
        )
    };
    let t = text.trim();
    if t == "none" {
        return Ok(Lease::None);
    }
    let (boot, until) = t.split_once(' ').ok_or_else(|| bad("not a lease"))?;
    if boot != boot_id() {
        return Err(bad("written in another boot"));
    }
    until
        .parse::<u64>()
        .map(Lease::Until)
        .map_err(|_| bad("not a lease"))
}

/// Writes the lease file atomically (a reader never sees half of it).
pub fn write(path: &Path, lease: Lease) -> std::io::Result<()> {
    let text = match lease {
        Lease::None => "none\n".to_string(),
        Lease::Until(t) => format!("{} {t}\n", boot_id()),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    // Readable by a VMM running as another user (an instant is no secret), whatever the
    // writer's umask.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_round_trips_and_garbage_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lease");
        write(&p, Lease::Until(42)).unwrap();
        assert_eq!(read(&p).unwrap(), Lease::Until(42));
        write(&p, Lease::None).unwrap();
        assert_eq!(read(&p).unwrap(), Lease::None);
        std::fs::write(&p, "soon").unwrap();
        assert!(read(&p).is_err());
        std::fs::write(&p, "00000000-0000-0000-0000-000000000000 99999999999999").unwrap();
        assert!(read(&p).is_err(), "another boot's lease was taken");
        assert!(read(&d.path().join("missing")).is_err());
        assert!(Lease::Until(10).lapsed_at(10));
        assert!(!Lease::Until(10).lapsed_at(9));
        assert!(!Lease::None.lapsed_at(u64::MAX));
        assert!(now_ns() > 0);
    }
}
