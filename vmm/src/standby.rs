//! A standby VMM (docs/standby.md): on a second host, it holds a VM's memory as of the VM's
//! newest checkpoint and follows each new one, reading only the pages that changed; promoted
//! when the VM's host fails, it rolls the disks back to that checkpoint, loads the vCPU and
//! device state (a few KiB) and runs the guest — no boot, no memory read from shared storage
//! beyond the last changes, no disk copy.
//!
//! Until the promotion the process has no vCPU, no device and no KVM VM: only the memory (a
//! memfd, as a booted VM has) and its API, which answers `info` (state `standby`), `promote` and
//! `shutdown`. Nothing it does touches the checkpoints or the disks before the promotion: the
//! active VMM keeps writing them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::api::{self, BootProtocol, Info, Promoted, Request, Response, RunState};
use crate::builder::RestoredMemory;
use crate::checkpoint::{self, Changes};
use crate::config::SerialOutput;
use crate::memory::{self, GuestMemory, Layout};
use crate::snapshot;
use crate::vmm::{Machine, VmmEvent};

/// How often the checkpoint directory is looked at for a newer checkpoint.
const POLL: Duration = Duration::from_millis(200);
const PAGE: u64 = 4096;
/// Changed pages are read in runs of at most this much.
const RUN: u64 = 1 << 20;

/// The memory of one checkpoint, loaded.
struct Held {
    seq: u64,
    layout: Layout,
    config: serde_json::Value,
    vcpus: u32,
    memory_mib: u64,
    mem: GuestMemory,
    memfd: File,
}

/// The standby's state: the checkpoint directory it follows and what it holds of it.
pub struct Standby {
    dir: PathBuf,
    held: Option<Held>,
    started: Instant,
}

impl Standby {
    pub fn new(dir: PathBuf) -> Self {
        Standby {
            dir,
            held: None,
            started: Instant::now(),
        }
    }

    /// The checkpoint whose memory it holds.
    pub fn seq(&self) -> Option<u64> {
        self.held.as_ref().map(|h| h.seq)
    }

    /// Brings the held memory up to the newest usable checkpoint, if there is a newer one.
    /// Returns the seq held afterwards.
    pub fn refresh(&mut self) -> Option<u64> {
        for (seq, path) in checkpoint::published(&self.dir) {
            if Some(seq) <= self.seq() {
                break;
            }
            match self.load(seq, &path) {
                Ok(pages) => {
                    tracing::debug!(seq, pages, "standby follows a checkpoint");
                    break;
                }
                Err(e) => tracing::warn!(seq, error = %e, "standby cannot use a checkpoint"),
            }
        }
        self.seq()
    }

    /// Loads checkpoint `seq` at `path`: only its changes where it follows the one held, else
    /// whole. Returns the pages read. A checkpoint rewritten while it was read (the writer
    /// renames a slot before it rewrites it) is not kept.
    fn load(&mut self, seq: u64, path: &Path) -> Result<u64> {
        checkpoint::check(path).map_err(anyhow::Error::msg)?;
        let state = snapshot::read_state(path)?;
        let layout = state.config.memory_layout();
        let file = snapshot::open_memory(path, state.config.memory_bytes())?;
        let changes = Changes::read(path).ok();
        let follows =
            |h: &Held| h.layout == layout && changes.as_ref().and_then(|c| c.since) == Some(h.seq);
        let (pages, held) = match self.held.take() {
            Some(mut h) if follows(&h) => {
                let pages = apply(
                    &h.mem,
                    &file,
                    changes.as_ref().map_or(&[][..], |c| &c.pages),
                );
                // A failed or torn update leaves memory from no one checkpoint: dropped.
                let pages = pages?;
                h.seq = seq;
                (pages, h)
            }
            _ => {
                let (mem, memfd) = memory::create_guest_memory(layout)?;
                let size = layout.total();
                let bytes = snapshot::copy_extents(&file, &memfd, size)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let held = Held {
                    seq,
                    layout,
                    config: serde_json::Value::Null,
                    vcpus: 0,
                    memory_mib: 0,
                    mem,
                    memfd,
                };
                (bytes / PAGE, held)
            }
        };
        if !path.exists() {
            anyhow::bail!("rewritten while it was read");
        }
        self.held = Some(Held {
            config: serde_json::to_value(&state.config).unwrap_or_default(),
            vcpus: u32::from(state.config.vcpus),
            memory_mib: state.config.memory_mib,
            ..held
        });
        Ok(pages)
    }

    fn info(&self) -> Info {
        let h = self.held.as_ref();
        Info {
            state: RunState::Standby,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vcpus: h.map_or(0, |h| h.vcpus),
            memory_mib: h.map_or(0, |h| h.memory_mib),
            boot_protocol: BootProtocol::Restored,
            config: h.map(|h| h.config.clone()).unwrap_or_default(),
            balloon: None,
            migration: None,
            standby_seq: self.seq(),
        }
    }

    /// Takes the newest usable checkpoint (as `restore --checkpoint` does: renamed so nobody
    /// else takes it, the disks rolled back to it) and starts the guest from it, with the held
    /// memory where it is that checkpoint's or only its last changes are missing. The caller
    /// must know the VM's previous VMM is gone (its host fenced).
    fn promote(
        &mut self,
        serial: SerialOutput,
        api_socket: Option<PathBuf>,
        events: crate::builder::Events,
    ) -> Result<(Machine, Promoted)> {
        let t0 = Instant::now();
        // Whatever was published since the last look, while the directory is still as it was.
        self.refresh();
        let mut chosen = checkpoint::choose_and_roll_back(&self.dir)?;
        checkpoint::remove_later(std::mem::take(&mut chosen.discarded));
        let chosen_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let state = snapshot::read_state(&chosen.dir)?;
        let layout = state.config.memory_layout();
        let mut pages_applied = 0;
        let memory = match self.held.take() {
            Some(h) if h.seq == chosen.meta.seq && h.layout == layout => {
                Some(RestoredMemory::Loaded(h.mem, h.memfd))
            }
            Some(h)
                if h.layout == layout
                    && Changes::read(&chosen.dir).is_ok_and(|c| c.since == Some(h.seq)) =>
            {
                let c = Changes::read(&chosen.dir).map_err(anyhow::Error::msg)?;
                let file = snapshot::open_memory(&chosen.dir, state.config.memory_bytes())?;
                pages_applied = apply(&h.mem, &file, &c.pages)?;
                Some(RestoredMemory::Loaded(h.mem, h.memfd))
            }
            _ => None,
        };
        let warm = memory.is_some();
        let memory = match memory {
            Some(m) => m,
            None => RestoredMemory::File(snapshot::open_memory(
                &chosen.dir,
                state.config.memory_bytes(),
            )?),
        };
        let memory_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let kvm = crate::vm::open_kvm()?;
        let machine = Machine::restore_state(
            &chosen.dir,
            state,
            memory,
            (serial, api_socket, false, Some(events)),
            kvm,
        )?;
        tracing::info!(
            chosen_ms,
            memory_ms,
            built_ms = t0.elapsed().as_secs_f64() * 1000.0,
            "promotion"
        );
        let promoted = Promoted {
            seq: chosen.meta.seq,
            taken_unix_ms: chosen.meta.taken_unix_ms,
            skipped: chosen.skipped,
            warm,
            pages_applied,
            took_ms: t0.elapsed().as_secs_f64() * 1000.0,
        };
        Ok((machine, promoted))
    }
}

/// Reads the pages set in `pages` (per region, as in [`Changes`]) from a checkpoint's memory
/// file into `mem`, in runs. Returns the pages read.
fn apply(mem: &GuestMemory, file: &File, pages: &[Vec<u64>]) -> Result<u64> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};
    let mut buf = vec![0u8; RUN as usize];
    let mut count = 0;
    let mut file_off = 0;
    for (region, bitmap) in mem.iter().zip(pages) {
        let base = region.start_addr().0;
        let limit = region.len() / PAGE;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (word_i, word) in bitmap.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let page = word_i as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                if page >= limit {
                    anyhow::bail!("changed page {page} lies outside its region");
                }
                match runs.last_mut() {
                    Some((start, n)) if *start + *n == page && (*n + 1) * PAGE <= RUN => *n += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        for (start, n) in runs {
            let len = (n * PAGE) as usize;
            file.read_exact_at(&mut buf[..len], file_off + start * PAGE)
                .context("cannot read the checkpoint's memory")?;
            mem.write_slice(&buf[..len], GuestAddress(base + start * PAGE))
                .map_err(|e| anyhow::anyhow!("cannot write guest memory: {e}"))?;
            count += n;
        }
        file_off += region.len();
    }
    Ok(count)
}

/// Runs a standby VMM until it is promoted (then runs the guest to its end, like `restore`) or
/// shut down. Returns the exit code.
pub fn run(dir: PathBuf, serial: SerialOutput, api_socket: Option<PathBuf>) -> Result<i32> {
    let mut standby = Standby::new(dir);
    let (tx, rx) = channel();
    if let Some(path) = &api_socket {
        let listener = api::server::bind(path)?;
        let submit_tx = tx.clone();
        let submit: api::server::Submit =
            Arc::new(move |req, reply| submit_tx.send(VmmEvent::Api(req, reply)).is_ok());
        api::server::spawn(listener, submit).context("cannot start the API thread")?;
    }
    standby.refresh();
    let mut next_look = Instant::now() + POLL;
    loop {
        let wait = next_look.saturating_duration_since(Instant::now());
        let (req, reply) = match rx.recv_timeout(wait) {
            Ok(VmmEvent::Api(req, reply)) => (req, reply),
            Ok(_) => continue,
            Err(RecvTimeoutError::Timeout) => {
                standby.refresh();
                next_look = Instant::now() + POLL;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(0),
        };
        match req {
            Request::Info {} => reply.send(Response::ok(&standby.info())),
            Request::Shutdown { .. } => {
                reply.send_and_flush(Response::ok(&api::Stopped {
                    stopped: api::StopKind::Graceful,
                }));
                return Ok(0);
            }
            Request::Promote {} => {
                match standby.promote(serial.clone(), api_socket.clone(), (tx.clone(), rx)) {
                    Ok((machine, promoted)) => {
                        tracing::info!(
                            seq = promoted.seq,
                            warm = promoted.warm,
                            pages = promoted.pages_applied,
                            took_ms = promoted.took_ms,
                            "standby promoted"
                        );
                        eprintln!(
                            "{}{}",
                            api::CHECKPOINT_RESUMED_LINE,
                            serde_json::json!({
                                "seq": promoted.seq,
                                "taken_unix_ms": promoted.taken_unix_ms,
                                "skipped": promoted.skipped,
                            })
                        );
                        reply.send(Response::ok(&promoted));
                        let outcome = machine.run();
                        if outcome.exit_code != 0 {
                            eprintln!("vmm: {}", outcome.reason);
                        }
                        return Ok(outcome.exit_code);
                    }
                    Err(e) => {
                        // Nothing runs: what failed is said, and the process ends (the
                        // checkpoint may be taken and the disks rolled back already).
                        let why = format!("cannot promote the standby: {e:#}");
                        reply.send_and_flush(Response::err(why.clone()));
                        anyhow::bail!(why);
                    }
                }
            }
            _ => reply.send(Response::err(
                "this VMM is a standby: it answers info, promote and shutdown only",
            )),
        }
    }
}
