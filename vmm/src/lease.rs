//! Self-fencing: with `--lease FILE` the VMM stops its guest, at once and by itself, when the
//! host's lease lapses (the file's format is `vmm_api::lease`). It does not wait for the agent:
//! an agent that is hung, dead or cut off from the queue cannot stop it, and the VIM restarts the
//! VM elsewhere once the lease has certainly lapsed.

use std::path::PathBuf;
use std::time::Duration;

use vmm_api::lease;

/// How often the lease file is read: the fence comes at most this late after the lapse (the VIM
/// allows for it in its margin).
pub const POLL: Duration = Duration::from_millis(20);

/// Watches `path` on a thread of its own; exits the process when the lease lapses or the file
/// cannot be read (failing safe: a lease nobody can show is no lease). Checked once before
/// returning, so a VMM never starts a guest under a lapsed lease.
pub fn watch(path: PathBuf) -> std::io::Result<()> {
    check(&path);
    crate::seccomp::spawn(crate::seccomp::Kind::Vmm, "lease".into(), move || loop {
        std::thread::sleep(POLL);
        check(&path);
    })?;
    Ok(())
}

fn check(path: &std::path::Path) {
    let why = match lease::read(path) {
        Ok(l) if !l.lapsed_at(lease::now_ns()) => return,
        Ok(_) => "the host's lease lapsed".to_string(),
        Err(e) => format!("cannot read the host's lease: {e}"),
    };
    // The message the agent reads in the VMM's log, then an immediate exit: no device or vCPU
    // gets to run another step, and the disk's lock goes with the process.
    eprintln!("vmm: fenced: {why}; stopping the guest");
    std::process::exit(lease::FENCED_EXIT);
}
