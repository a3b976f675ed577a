//! The guest's own heartbeat, probed: a VMM that answers its API says nothing of the guest
//! inside (hung kernel, paused, spinning with interrupts off). The guest prints heartbeat lines
//! on its serial console (`... hb n=N ...`: the test guest every `tg.hb_ms`, the Debian image's
//! init every second); each poll reads what the console gained since the last. No new heartbeat
//! for `misses` polls in a row makes the VM unreachable (`VM_Unreachable`), the next one
//! reachable again (`VM_Reachable`). A guest that has never printed a heartbeat is not judged:
//! it has no way to show it is alive.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// What marks a heartbeat line.
const MARK: &[u8] = b"hb n=";
/// The most of a console read per poll (a chatty guest's older lines are skipped, not read).
const MAX_READ: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// No heartbeat for this many polls.
    Unreachable {
        silent_polls: u32,
    },
    Reachable,
}

#[derive(Debug, Default)]
pub struct Probe {
    /// How far the console has been read; None before the first poll.
    offset: Option<u64>,
    /// The guest has printed a heartbeat since the probe began.
    armed: bool,
    silent: u32,
    unreachable: bool,
}

impl Probe {
    /// Reads what `console` gained and says whether the guest's reachability changed.
    /// `misses`: polls without a heartbeat that make it unreachable (at least 1).
    pub fn poll(&mut self, console: &Path, misses: u32) -> Option<Change> {
        let beat = match self.read_new(console) {
            Ok(new) => new.windows(MARK.len()).any(|w| w == MARK),
            Err(e) => {
                tracing::debug!(console = %console.display(), error = %e, "cannot read the console");
                false
            }
        };
        self.judge(beat, misses.max(1))
    }

    /// The VM is not meant to beat now (not running here, or busy with a command): the
    /// silence so far does not count.
    pub fn pause(&mut self) {
        self.silent = 0;
    }

    fn judge(&mut self, beat: bool, misses: u32) -> Option<Change> {
        if beat {
            self.armed = true;
            self.silent = 0;
            if self.unreachable {
                self.unreachable = false;
                return Some(Change::Reachable);
            }
            return None;
        }
        if !self.armed || self.unreachable {
            return None;
        }
        self.silent += 1;
        if self.silent >= misses {
            self.unreachable = true;
            return Some(Change::Unreachable {
                silent_polls: self.silent,
            });
        }
        None
    }

    fn read_new(&mut self, console: &Path) -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(console)?;
        let len = f.metadata()?.len();
        // A console that shrank was started afresh (a new VMM): read it from its start.
        let from = match self.offset {
            Some(o) if o <= len => o,
            Some(_) => 0,
            // First look: only the recent past, so an old long log is not read whole.
            None => len.saturating_sub(MAX_READ),
        };
        let from = from.max(len.saturating_sub(MAX_READ));
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::with_capacity((len - from) as usize);
        f.take(len - from).read_to_end(&mut buf)?;
        self.offset = Some(from + buf.len() as u64);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Silent for `misses` polls after a heartbeat: unreachable, once; a heartbeat again:
    /// reachable, once. Before any heartbeat, silence says nothing. Lines without the mark do
    /// not count as heartbeats.
    #[test]
    fn silence_after_heartbeats_is_unreachable_until_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut p = Probe::default();
        for _ in 0..5 {
            assert_eq!(p.poll(&path, 3), None, "never armed");
        }
        writeln!(f, "tg: ready cpus=1").unwrap();
        assert_eq!(p.poll(&path, 3), None);
        writeln!(f, "tg: hb n=1 t_ms=1000").unwrap();
        assert_eq!(p.poll(&path, 3), None);
        writeln!(f, "tg: hb n=2 t_ms=2000").unwrap();
        assert_eq!(p.poll(&path, 3), None);
        writeln!(f, "kernel: some other line").unwrap();
        assert_eq!(p.poll(&path, 3), None);
        assert_eq!(p.poll(&path, 3), None);
        assert_eq!(
            p.poll(&path, 3),
            Some(Change::Unreachable { silent_polls: 3 })
        );
        assert_eq!(p.poll(&path, 3), None, "said once");
        writeln!(f, "tg: hb n=3 t_ms=9000").unwrap();
        assert_eq!(p.poll(&path, 3), Some(Change::Reachable));
        assert_eq!(p.poll(&path, 3), None);
        // Paused (a command under way): the silence so far is forgotten.
        p.pause();
        assert_eq!(p.poll(&path, 3), None);
        assert_eq!(p.poll(&path, 3), None);
        p.pause();
        assert_eq!(p.poll(&path, 3), None);
    }

    /// A console started afresh (shorter than read so far) is read from its start; a missing
    /// one is silence.
    #[test]
    fn a_new_console_is_read_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "tg: hb n=1\ntg: hb n=2\n").unwrap();
        let mut p = Probe::default();
        assert_eq!(p.poll(&path, 1), None);
        assert_eq!(
            p.poll(&path, 1),
            Some(Change::Unreachable { silent_polls: 1 })
        );
        std::fs::write(&path, "hb n=1\n").unwrap();
        assert_eq!(p.poll(&path, 1), Some(Change::Reachable));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            p.poll(&path, 1),
            Some(Change::Unreachable { silent_polls: 1 })
        );
    }
}
