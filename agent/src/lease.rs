//! The host's lease (docs/failover.md). The agent renews it by publishing a `LeaseRenewal` to
//! the `VIM_LEASES` stream every quarter of the lease; a renewal the server acknowledged holds
//! the lease for `lease_ms` from the moment it was *sent*. The instant it holds until is written
//! to the lease file every VMM of this host watches (`vmm --lease`): when it passes — the host
//! is cut off from the queue, or this agent hangs or died — each VMM stops its guest by itself.
//! vimd restarts the VMs elsewhere only after the lease has certainly lapsed.
//!
//! The lease's length is vimd's to set: it is the stream's description, read here every few
//! seconds (so it reaches the agent while vimd is down) and kept in the state directory for an
//! agent that starts cut off.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::watch;
use vim_proto::{subjects as s, EventKind, HostEvent, PROTOCOL_VERSION};
use vmm_api::lease::{self, Lease};

use crate::Agent;

/// The agent's own fence comes this long after the lapse: the VMMs stop themselves first (they
/// look every 20 ms); this is for one that does not. Well inside vimd's margin (500 ms).
const BACKUP_FENCE_AFTER_NS: u64 = 200_000_000;

/// A VMM still alive this long after the fence's SIGKILL is stuck in the kernel (say in I/O to
/// a hung NFS server): the host is then not sound, and the watchdog, if there is one, resets it.
const FENCE_GRACE: Duration = Duration::from_secs(2);

/// How often the lease's length is read from the stream.
const READ_LENGTH_EVERY: Duration = Duration::from_secs(5);

/// The directory of the lease file VMMs watch: all a jailed VMM sees of the agent's state
/// (the file is replaced by a rename, so its directory is what is bound into the jail).
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fence")
}

/// The lease file VMMs watch.
pub fn file(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("lease")
}

/// Where agents before the jail kept the lease: VMMs they started, re-adopted after an
/// upgrade, still watch it, so it is written too while it exists.
fn legacy_file(state_dir: &Path) -> PathBuf {
    state_dir.join("lease")
}

fn length_file(state_dir: &Path) -> PathBuf {
    state_dir.join("lease.ms")
}

/// Before any VMM starts: a lease file exists. One left by the previous agent stands (it holds
/// until its instant, whoever wrote it); without one, a host that has held a lease starts with
/// it lapsed (renewing it is the first thing done), and one that never has holds none.
pub fn init(state_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir(state_dir))?;
    // The lease is readable by the VMM user (it holds no secret: an instant).
    std::fs::set_permissions(dir(state_dir), std::fs::Permissions::from_mode(0o755))?;
    let f = file(state_dir);
    if lease::read(&f).is_ok() {
        return Ok(());
    }
    if let Ok(l) = lease::read(&legacy_file(state_dir)) {
        lease::write(&f, l)?;
        return Ok(());
    }
    let l = match stored_length(state_dir) {
        0 => Lease::None,
        _ => Lease::Until(lease::now_ns()),
    };
    lease::write(&f, l)?;
    Ok(())
}

fn stored_length(state_dir: &Path) -> u64 {
    std::fs::read_to_string(length_file(state_dir))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Keeps the lease until `stop`.
pub async fn run(a: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let state_dir = a.host.dirs().state_dir.clone();
    let f = file(&state_dir);
    let mut length_ms = stored_length(&state_dir);
    let mut length_read: Option<Instant> = None;
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut seq = 0u64;
    // The instant the lease holds until (0: not held), and when it lapsed if it has.
    let mut until = match lease::read(&f) {
        Ok(Lease::Until(t)) => t,
        _ => 0,
    };
    let mut lapsed: Option<u64> = None;
    let mut failures = 0u32;
    // The VMMs the fence killed, and when: each must be gone within FENCE_GRACE.
    let mut fenced: Option<(Instant, Vec<u32>)> = None;
    loop {
        if length_read.is_none_or(|t| t.elapsed() >= READ_LENGTH_EVERY) {
            if let Some(ms) = read_length(&a).await {
                length_read = Some(Instant::now());
                if ms != length_ms {
                    tracing::info!(lease_ms = ms, "the VIM's lease length");
                    length_ms = ms;
                    let _ = std::fs::write(length_file(&state_dir), ms.to_string());
                    if ms == 0 {
                        until = 0;
                        lapsed = None;
                        write(&f, Lease::None);
                    }
                }
            }
        }
        let period = if length_ms == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_millis((length_ms / 4).clamp(20, 10_000))
        };
        if length_ms > 0 {
            seq += 1;
            let sent = lease::now_ns();
            let r = vim_proto::LeaseRenewal {
                version: PROTOCOL_VERSION,
                host_id: a.cfg.host_id.clone(),
                lease_ms: length_ms,
                seq,
                boot,
            };
            let renewed = tokio::time::timeout(period, async {
                a.js.publish(s::lease(&a.cfg.host_id), r.encode_to_vec().into())
                    .await?
                    .await
                    .map_err(anyhow::Error::from)
            })
            .await;
            match renewed {
                Ok(Ok(_)) => {
                    until = sent + length_ms * 1_000_000;
                    write(&f, Lease::Until(until));
                    failures = 0;
                    if let Some(at) = lapsed.take() {
                        report_fenced(&a, (lease::now_ns() - at) / 1_000_000).await;
                    }
                }
                Ok(Err(e)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, failures, "lease not renewed");
                    }
                }
                Err(_) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(failures, "lease not renewed in time");
                    }
                }
            }
            let now = lease::now_ns();
            if until != 0 && now >= until + BACKUP_FENCE_AFTER_NS && lapsed.is_none() {
                lapsed = Some(until);
                // The VMMs stop themselves (they watch the file); a VMM that does not is
                // stopped here all the same.
                let killed = a.host.fence();
                tracing::error!(
                    vmms = killed.len(),
                    "the host's lease lapsed: its VMs are stopped (fenced)"
                );
                fenced = Some((Instant::now(), killed));
            }
            if let Some((at, pids)) = &mut fenced {
                if at.elapsed() >= FENCE_GRACE {
                    pids.retain(|p| crate::vms::is_live_vmm(*p));
                    let sound = pids.is_empty();
                    if !sound && a.sound.load(Ordering::SeqCst) {
                        tracing::error!(pids = ?pids, "VMMs outlived the fence's SIGKILL");
                    }
                    a.sound.store(sound, Ordering::SeqCst);
                    if sound {
                        fenced = None;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
    }
}

fn write(f: &Path, l: Lease) {
    if let Err(e) = lease::write(f, l) {
        // The VMMs cannot read a lease they are not shown: they stop when the old one lapses.
        tracing::error!(file = %f.display(), error = %e, "cannot write the lease file");
    }
    let legacy = f
        .parent()
        .and_then(Path::parent)
        .map(legacy_file)
        .filter(|p| p.exists());
    if let Some(legacy) = legacy {
        if let Err(e) = lease::write(&legacy, l) {
            tracing::error!(file = %legacy.display(), error = %e, "cannot write the lease file");
        }
    }
}

/// The lease length vimd set: the lease stream's description (None: cannot be read now).
async fn read_length(a: &Agent) -> Option<u64> {
    let read = async {
        let mut st = a.js.get_stream(s::LEASE_STREAM).await.ok()?;
        let info = st.info().await.ok()?;
        info.config
            .description
            .as_deref()
            .and_then(vim_proto::parse_lease_description)
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// Tells vimd, once the queue is reachable again, that this host stopped its VMs.
async fn report_fenced(a: &Agent, lapsed_ms: u64) {
    let ev = HostEvent {
        version: PROTOCOL_VERSION,
        host_id: a.cfg.host_id.clone(),
        ok: true,
        kind: EventKind::HostSelfFenced.into(),
        error: format!("the lease lapsed {lapsed_ms} ms ago; the VMs were stopped"),
        ..Default::default()
    };
    if let Err(e) = a.publish_event(&ev).await {
        tracing::warn!(error = %e, "cannot report the fence");
    }
}
