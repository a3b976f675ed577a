//! The console file: a log the guest writes, rotated at a size the host chooses.

use std::io::Write;
use std::sync::mpsc::{channel, Sender};

/// How large a console file grows before it is rotated (to `PATH.1`, replacing the one
/// before): the guest decides how much it prints, so the host's disk holds at most twice this.
pub const CONSOLE_CAP: u64 = 16 << 20;

/// A log file the guest writes, kept under a size: past `cap` bytes it is renamed to `PATH.1`
/// and started anew. The guest writes on a vCPU thread, whose seccomp filter allows no path
/// operations: the rename and the new file are done by a thread of the log's own, which the
/// writer waits for (microseconds, once per `cap` bytes).
pub struct CappedLog {
    file: std::fs::File,
    len: u64,
    cap: u64,
    rotator: Sender<Sender<std::io::Result<std::fs::File>>>,
}

impl CappedLog {
    pub fn open(path: &std::path::Path, cap: u64) -> std::io::Result<CappedLog> {
        let file = create(path)?;
        let len = file.metadata()?.len();
        let (rotator, requests) = channel::<Sender<std::io::Result<std::fs::File>>>();
        let path = path.to_path_buf();
        crate::seccomp::spawn(crate::seccomp::Kind::Vmm, "console-log".into(), move || {
            for reply in requests {
                let _ = reply.send(rotate(&path));
            }
        })?;
        Ok(CappedLog {
            file,
            len,
            cap: cap.max(4096),
            rotator,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let gone = || std::io::Error::other("the console log's thread has stopped");
        let (reply, answer) = channel();
        self.rotator.send(reply).map_err(|_| gone())?;
        self.file = answer.recv().map_err(|_| gone())??;
        self.len = 0;
        Ok(())
    }
}

fn create(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// `PATH` becomes `PATH.1` (replacing the one before), and a new `PATH` is opened.
fn rotate(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut old = path.as_os_str().to_os_string();
    old.push(".1");
    std::fs::rename(path, old)?;
    create(path)
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len + buf.len() as u64 > self.cap && self.len > 0 {
            if let Err(e) = self.rotate() {
                tracing::warn!(error = %e, "cannot rotate the console file");
            }
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_file_is_rotated_at_its_cap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut l = CappedLog::open(&p, 10_000).unwrap();
        for i in 0..3000 {
            writeln!(l, "line {i}").unwrap();
        }
        let now = std::fs::metadata(&p).unwrap().len();
        let before = std::fs::metadata(d.path().join("console.log.1"))
            .unwrap()
            .len();
        assert!(now <= 10_000 && before <= 10_000, "{now} {before}");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with("line 2999\n"));
    }
}
