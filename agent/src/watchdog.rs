//! The host's watchdog (`--watchdog /dev/watchdog`): the last guard behind the lease
//! (docs/failover.md). The agent keeps the watchdog fed while it runs and its host is sound; the
//! watchdog resets the host when
//! - the agent stops running (hung, stopped, or starved: the whole host stuck), or
//! - the lease lapsed and a VMM outlived the fence (SIGKILL does not end a process stuck in the
//!   kernel, say on a hung NFS server; when the storage comes back it could write to a disk the
//!   VM's new host owns now).
//!
//! A clean agent exit disarms it (the "magic close": `V`, then close), so restarting or
//! upgrading the agent resets nothing, unless the kernel was built with `WATCHDOG_NOWAYOUT`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

// linux/watchdog.h
nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the watchdog {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("{0} is not a watchdog device (not a character device)")]
    NotADevice(PathBuf),
    #[error("the watchdog {0} refused a timeout of {1} s: {2}")]
    Timeout(PathBuf, u32, nix::Error),
}

/// An armed watchdog: it resets the host unless fed every `timeout_s`.
pub struct Watchdog {
    dev: File,
    path: PathBuf,
    timeout_s: u32,
}

impl Watchdog {
    /// Opens (and so arms) the watchdog and sets its timeout; the driver may round it, and the
    /// value it took is the one kept.
    pub fn open(path: &Path, timeout_s: u32) -> Result<Watchdog, Error> {
        let meta = std::fs::metadata(path).map_err(|e| Error::Open(path.into(), e))?;
        if !meta.file_type().is_char_device() {
            return Err(Error::NotADevice(path.into()));
        }
        // std opens with O_CLOEXEC: the VMMs the agent starts never hold it.
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::Open(path.into(), e))?;
        let mut t = timeout_s as libc::c_int;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one int, which `t` is, on a descriptor we own.
        unsafe { wdioc_settimeout(dev.as_raw_fd(), &mut t) }
            .map_err(|e| Error::Timeout(path.into(), timeout_s, e))?;
        Ok(Watchdog {
            dev,
            path: path.into(),
            timeout_s: t.max(1) as u32,
        })
    }

    pub fn timeout_s(&self) -> u32 {
        self.timeout_s
    }

    /// How often it is fed: four times per timeout, so one late wake-up never lets it fire.
    fn period(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_s) * 250)
    }

    fn feed(&mut self) -> std::io::Result<()> {
        self.dev.write_all(b"\0")
    }

    /// Disarms it (the magic close) and closes it.
    fn disarm(mut self) {
        if let Err(e) = self.dev.write_all(b"V") {
            tracing::warn!(device = %self.path.display(), error = %e, "cannot disarm the watchdog");
        }
    }
}

/// Feeds `w` while `sound` holds, until `stop`; then disarms it.
pub async fn run(mut w: Watchdog, sound: Arc<AtomicBool>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(w.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut starving = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if sound.load(Ordering::SeqCst) {
            if starving {
                starving = false;
                tracing::warn!("the host is sound again: the watchdog is fed");
            }
            if let Err(e) = w.feed() {
                tracing::error!(device = %w.path.display(), error = %e, "cannot feed the watchdog");
            }
        } else if !starving {
            starving = true;
            tracing::error!(
                timeout_s = w.timeout_s,
                "a VMM outlived the fence: the watchdog is no longer fed and resets the host"
            );
        }
    }
    w.disarm();
    tracing::info!("watchdog disarmed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_device_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Watchdog::open(f.path(), 10),
            Err(Error::NotADevice(_))
        ));
        assert!(matches!(
            Watchdog::open(Path::new("/nonexistent/watchdog"), 10),
            Err(Error::Open(..))
        ));
    }

    #[test]
    fn a_device_that_is_not_a_watchdog_is_refused() {
        // /dev/null is a character device without the watchdog's ioctls.
        assert!(matches!(
            Watchdog::open(Path::new("/dev/null"), 10),
            Err(Error::Timeout(..))
        ));
    }

    /// Fed while sound, not while not; disarmed with `V` when stopped. (A regular file stands
    /// in for the device here; the nested lane resets a real host with softdog.)
    #[tokio::test(start_paused = true)]
    async fn fed_only_while_sound_then_disarmed() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let w = Watchdog {
            dev: File::options().append(true).open(f.path()).unwrap(),
            path: f.path().into(),
            timeout_s: 1,
        };
        let sound = Arc::new(AtomicBool::new(true));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(w, sound.clone(), stop));
        let fed = || std::fs::read(f.path()).unwrap().len();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let n = fed();
        assert!(n >= 4, "fed {n} times in 1.1 s at a 250 ms period");
        sound.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = fed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fed(), m, "fed while the host was not sound");
        sound.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(fed() > m, "not fed again once sound");
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let bytes = std::fs::read(f.path()).unwrap();
        assert_eq!(bytes.last(), Some(&b'V'), "not disarmed: {bytes:?}");
        assert!(bytes[..bytes.len() - 1].iter().all(|b| *b == 0));
    }
}
