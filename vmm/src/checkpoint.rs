//! Replicated checkpoints (docs/checkpoint.md): the running VM's memory, device state and a
//! point-in-time copy of its writable disks, written into a directory on shared storage so that
//! another host can resume the guest from it when this one dies.
//!
//! A checkpoint is a directory `ckpt-<seq>`; the last two complete ones are kept. A new one is
//! written into the older of the two: it is renamed `ckpt-<seq>.partial` (so it is never used
//! half-written), brought up to date with only the pages and disk blocks changed since it was
//! last written — while the guest runs, in rounds, and for the last few during a short pause —
//! then made durable and published by renaming it back to `ckpt-<seq>`. A VMM that has not yet
//! written a slot itself (the first two checkpoints of a process) writes it whole, into new
//! files: a VM resumed from a checkpoint still maps that checkpoint's memory file.
//!
//! Pages come from KVM's dirty log and the VMM's own (as for live migration); disk blocks from
//! the write log each virtio-blk device keeps ([`DiskView`]). Both logs, once on, stay on between
//! checkpoints; each read of them is added to both slots' sets of changes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::{CheckpointDone, RunState, CHECKPOINT_PREFIX};
use crate::config::VmConfig;
use crate::devices::virtio::block::{DiskView, DIRTY_BLOCK};
use crate::migrate::RunControl;
use crate::persist::Components;
use crate::snapshot;

const PAGE: u64 = 4096;
const PARTIAL: &str = ".partial";
/// What a checkpoint resumed from is renamed to: nobody else may use it, and it is not a slot.
const RESUMED_PREFIX: &str = "resumed-";
/// What the checkpoints older than the one resumed from are renamed to, until they are removed
/// (after the guest runs: unlinking gigabytes is no part of a recovery).
const DISCARDED_PREFIX: &str = "discarded-";
/// Each checkpoint's own record: when it was taken.
pub const META_FILE: &str = "checkpoint.json";
/// Each checkpoint's pages changed since the one before it ([`Changes`]): what a standby reads.
pub const CHANGES_FILE: &str = "changes.bin";
const CHANGES_MAGIC: &[u8; 8] = b"VMMCHG01";
/// The pause aims at no more than this: rounds go on while the guest runs until what is left
/// can be written within it.
const PAUSE_TARGET: Duration = Duration::from_millis(10);
const MAX_ROUNDS: u32 = 8;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Other(String),
    #[error("no usable checkpoint in {dir}{}", if .skipped.is_empty() { String::new() } else { format!(": {}", .skipped.join("; ")) })]
    NoneUsable { dir: PathBuf, skipped: Vec<String> },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io(path.into(), e)
}

/// A checkpoint's record, beside its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub seq: u64,
    /// When the guest was paused for it (wall clock, ms since the epoch).
    pub taken_unix_ms: u64,
    pub pause_ms: f64,
}

fn slot_name(seq: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{seq:020}")
}

/// The seq of a published checkpoint's directory name.
fn published_seq(name: &str) -> Option<u64> {
    name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()
}

/// Any seq a name in a checkpoint directory carries (published, partial or resumed).
fn any_seq(name: &str) -> Option<u64> {
    let n = name.strip_suffix(PARTIAL).unwrap_or(name);
    published_seq(n)
        .or_else(|| n.strip_prefix(RESUMED_PREFIX)?.parse().ok())
        .or_else(|| n.strip_prefix(DISCARDED_PREFIX)?.parse().ok())
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The published checkpoints in `dir`, newest first.
pub fn published(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = entries(dir)
        .into_iter()
        .filter_map(|n| published_seq(&n).map(|s| (s, dir.join(n))))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v
}

fn disk_file(slot: &Path, i: usize) -> PathBuf {
    slot.join(format!("disk-{i}.img"))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A slot this process wrote, and what changed since: per RAM region a page bitmap, per disk a
/// block bitmap (the layouts of KVM's dirty log and of [`DiskView::dirty`]).
struct Slot {
    seq: u64,
    pages: Vec<Vec<u64>>,
    blocks: Vec<Vec<u64>>,
}

impl Slot {
    fn clear(&mut self) {
        self.pages.iter_mut().flatten().for_each(|w| *w = 0);
        self.blocks.iter_mut().flatten().for_each(|w| *w = 0);
    }

    fn dirty_bytes(&self) -> u64 {
        let count = |v: &Vec<Vec<u64>>| -> u64 {
            v.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
        };
        count(&self.pages) * PAGE + count(&self.blocks) * DIRTY_BLOCK
    }
}

fn or_into(into: &mut Vec<Vec<u64>>, from: &[Vec<u64>]) {
    if into.len() < from.len() {
        into.resize(from.len(), Vec::new());
    }
    for (a, b) in into.iter_mut().zip(from) {
        if a.len() < b.len() {
            a.resize(b.len(), 0);
        }
        a.iter_mut().zip(b).for_each(|(x, y)| *x |= y);
    }
}

/// The VMM's memory of its checkpoints: where they go, and what changed since each slot it
/// wrote. Forgotten (`forget`) whenever something else reads the dirty logs (a migration).
#[derive(Default)]
pub struct Tracker {
    dir: Option<PathBuf>,
    next_seq: u64,
    slots: Vec<Slot>,
    /// The RAM regions `(guest address, length)` and disk count the slots were tracked with.
    layout: (Vec<(u64, u64)>, usize),
    logging: bool,
    /// Pages changed since the last published checkpoint's instant, for its successor's
    /// `changes.bin`; None: not known (nothing published by this process yet, or the logs were
    /// read by someone else), and the next one says so.
    delta: Option<Changes>,
}

/// The guest pages that changed between two checkpoints' instants, per RAM region (the layout of
/// KVM's dirty log). A standby that holds checkpoint `since` reads only these from the next.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub since: Option<u64>,
    pub pages: Vec<Vec<u64>>,
}

impl Changes {
    fn encode(&self) -> Vec<u8> {
        let mut out = CHANGES_MAGIC.to_vec();
        out.extend_from_slice(&self.since.unwrap_or(u64::MAX).to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for region in &self.pages {
            out.extend_from_slice(&(region.len() as u64).to_le_bytes());
            region
                .iter()
                .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
        }
        out.extend_from_slice(&crc32fast::hash(&out).to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> Result<Changes, String> {
        let (body, crc) = b
            .split_last_chunk::<4>()
            .ok_or_else(|| format!("{CHANGES_FILE}: truncated"))?;
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err(format!("{CHANGES_FILE}: CRC mismatch"));
        }
        let body = body
            .strip_prefix(CHANGES_MAGIC)
            .ok_or_else(|| format!("{CHANGES_FILE}: not a changes file"))?;
        let mut words = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
        let mut next = || {
            words
                .next()
                .ok_or_else(|| format!("{CHANGES_FILE}: truncated"))
        };
        let since = Some(next()?).filter(|&s| s != u64::MAX);
        let regions = next()?;
        let mut pages = Vec::new();
        for _ in 0..regions {
            let n = next()?;
            if n > (body.len() / 8) as u64 {
                return Err(format!("{CHANGES_FILE}: a region of {n} words is too long"));
            }
            pages.push((0..n).map(|_| next()).collect::<Result<_, _>>()?);
        }
        Ok(Changes { since, pages })
    }

    /// The changes written with the checkpoint in `slot`.
    pub fn read(slot: &Path) -> Result<Changes, String> {
        let path = slot.join(CHANGES_FILE);
        let b = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::decode(&b)
    }
}

/// What one checkpoint works with.
pub struct Source<'a> {
    pub parts: &'a Components,
    pub config: &'a VmConfig,
    pub run: &'a RunControl,
    /// Whether the guest runs (a paused guest is checkpointed without a pause of its own).
    pub running: bool,
}

impl Tracker {
    /// Nothing is known about any slot any more: the next checkpoints write whole ones. Call when
    /// the dirty logs are read or turned off by someone else.
    pub fn forget(&mut self) {
        self.slots.clear();
        self.logging = false;
        self.delta = None;
    }

    /// Writes one checkpoint into `dir` (module docs). On an error the guest runs as before and
    /// the previous checkpoint stays published.
    pub fn take(&mut self, dir: &Path, src: &Source) -> Result<CheckpointDone, CheckpointError> {
        let t0 = Instant::now();
        if self.dir.as_deref() != Some(dir) {
            *self = Tracker::default();
            self.start(dir)?;
        }
        let disks = src.parts.virtio.disks();
        let layout = {
            use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};
            let regions = src
                .parts
                .vm
                .ram()
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect();
            (regions, disks.len())
        };
        if layout != self.layout || !self.logging {
            // Memory was plugged or unplugged, or nothing is tracked: whole slots from here.
            self.slots.clear();
            self.delta = None;
            self.layout = layout;
        }
        if !self.logging {
            src.parts
                .vm
                .set_dirty_logging(true)
                .map_err(|e| CheckpointError::Other(format!("cannot enable dirty logging: {e}")))?;
            self.logging = true;
        }
        let seq = self.next_seq;
        let mut done = CheckpointDone {
            seq,
            path: dir.join(slot_name(seq)),
            pause_ms: 0.0,
            total_ms: 0.0,
            rounds: 0,
            bytes_written: 0,
            full: self.slots.len() < 2,
        };
        let partial = dir.join(format!("{}{PARTIAL}", slot_name(seq)));
        let mut taken = None;
        let result = self.write_slot(dir, &partial, src, &disks, &mut done, &mut taken);
        if let Err(e) = result {
            self.slots.retain(|s| s.seq != seq);
            let _ = std::fs::remove_dir_all(&partial);
            // The changes since the last published checkpoint are still owed to the next one.
            if let (Some(mut before), Some(after)) = (taken, self.delta.take()) {
                or_into(&mut before.pages, &after.pages);
                self.delta = Some(before);
            }
            return Err(e);
        }
        self.next_seq = seq + 1;
        // Keep the two newest.
        for (_, old) in published(dir).into_iter().skip(2) {
            if let Err(e) = std::fs::remove_dir_all(&old) {
                tracing::warn!(path = %old.display(), error = %e, "cannot remove an old checkpoint");
            }
        }
        done.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
        Ok(done)
    }

    /// The first checkpoint into `dir` from this process: the newest published checkpoint stays
    /// (it is still good until a newer one is), everything else goes.
    fn start(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let names = entries(dir);
        self.next_seq = names.iter().filter_map(|n| any_seq(n)).max().unwrap_or(0) + 1;
        let keep = published(dir).into_iter().next().map(|(_, p)| p);
        for n in names {
            let p = dir.join(&n);
            if Some(&p) != keep.as_ref() {
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
        self.dir = Some(dir.into());
        Ok(())
    }

    /// Reads both dirty logs and adds what changed to every slot's set.
    fn absorb(&mut self, src: &Source, disks: &[DiskView]) -> Result<(), CheckpointError> {
        let pages: Vec<Vec<u64>> = src
            .parts
            .vm
            .dirty_bitmaps()
            .map_err(|e| CheckpointError::Other(format!("dirty log: {e}")))?
            .into_iter()
            .map(|(_, _, b)| b)
            .collect();
        let blocks: Vec<Vec<u64>> = disks.iter().map(|d| d.dirty.get_and_reset()).collect();
        for s in &mut self.slots {
            or_into(&mut s.pages, &pages);
            or_into(&mut s.blocks, &blocks);
        }
        if let Some(d) = &mut self.delta {
            or_into(&mut d.pages, &pages);
        }
        Ok(())
    }

    fn write_slot(
        &mut self,
        dir: &Path,
        partial: &Path,
        src: &Source,
        disks: &[DiskView],
        done: &mut CheckpointDone,
        taken: &mut Option<Changes>,
    ) -> Result<(), CheckpointError> {
        let seq = done.seq;
        let _ = std::fs::remove_dir_all(partial);
        // Everything logged so far belongs to the slots already written.
        self.absorb(src, disks)?;
        let mem_path = partial.join(snapshot::MEMORY_FILE);
        let (memory, disk_files) = if done.full {
            std::fs::create_dir(partial).map_err(io(partial))?;
            let memory = create_sized(&mem_path, src.config.memory_bytes())?;
            let mut files = Vec::new();
            for (i, d) in disks.iter().enumerate() {
                let path = disk_file(partial, i);
                let len = d.file.metadata().map_err(io(&d.path))?.len();
                files.push(create_sized(&path, len)?);
            }
            // Tracked from now: what the guest changes during the whole copy is copied after it.
            self.slots.push(Slot {
                seq,
                pages: Vec::new(),
                blocks: Vec::new(),
            });
            done.bytes_written +=
                snapshot::copy_memory(&src.parts.vm.ram(), &src.parts.vm.backing, &memory)
                    .map_err(io(&mem_path))?;
            for (d, out) in disks.iter().zip(&files) {
                let len = d.file.metadata().map_err(io(&d.path))?.len();
                done.bytes_written +=
                    snapshot::copy_extents(&d.file, out, len).map_err(io(&d.path))?;
            }
            (memory, files)
        } else {
            // The older slot becomes this one: unpublished first, so it is never used while
            // it is neither the old checkpoint nor the new one.
            let i = if self.slots[0].seq < self.slots[1].seq {
                0
            } else {
                1
            };
            let old = dir.join(slot_name(self.slots[i].seq));
            std::fs::rename(&old, partial).map_err(io(&old))?;
            sync_dir(dir)?;
            self.slots[i].seq = seq;
            let open = |p: &Path| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(io(p))
            };
            let memory = open(&mem_path)?;
            let files = (0..disks.len())
                .map(|i| open(&disk_file(partial, i)))
                .collect::<Result<Vec<_>, _>>()?;
            (memory, files)
        };
        let slot = self
            .slots
            .iter()
            .position(|s| s.seq == seq)
            .ok_or_else(|| CheckpointError::Other("lost track of the slot".into()))?;

        // Rounds while the guest runs, until the rest fits in the pause.
        let mut bandwidth = 0.0f64;
        loop {
            self.absorb(src, disks)?;
            let remaining = self.slots[slot].dirty_bytes();
            let fits = remaining == 0
                || (bandwidth > 0.0 && remaining as f64 / bandwidth <= PAUSE_TARGET.as_secs_f64());
            if fits || done.rounds >= MAX_ROUNDS || !src.running {
                break;
            }
            done.rounds += 1;
            let t = Instant::now();
            done.bytes_written += self.copy_changes(slot, src, disks, &memory, &disk_files)?;
            bandwidth = remaining as f64 / t.elapsed().as_secs_f64().max(1e-6);
        }
        // What is written so far is made durable while the guest still runs.
        memory.sync_data().map_err(io(&mem_path))?;

        let paused_at = Instant::now();
        let taken_unix_ms = now_unix_ms();
        if src.running {
            (src.run)(RunState::Paused)
                .map_err(|e| CheckpointError::Other(format!("cannot pause: {e}")))?;
        }
        let last = self.absorb(src, disks).and_then(|()| {
            // What changed since the last checkpoint ends at this instant; from here on the
            // changes count from this one.
            *taken = self.delta.replace(Changes {
                since: Some(seq),
                pages: Vec::new(),
            });
            let n = self.copy_changes(slot, src, disks, &memory, &disk_files)?;
            let state = src
                .parts
                .save(src.config)
                .map_err(|e| CheckpointError::Other(e.to_string()))?;
            Ok((n, state))
        });
        if src.running {
            if let Err(e) = (src.run)(RunState::Running) {
                tracing::error!(error = %e, "the guest did not fully resume after a checkpoint");
            }
        }
        done.pause_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        let (n, state) = last?;
        done.bytes_written += n;

        // Durable, then published.
        memory.sync_data().map_err(io(&mem_path))?;
        for (i, f) in disk_files.iter().enumerate() {
            f.sync_data().map_err(io(&disk_file(partial, i)))?;
        }
        let meta = Meta {
            seq,
            taken_unix_ms,
            pause_ms: done.pause_ms,
        };
        let meta_path = partial.join(META_FILE);
        std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap_or_default())
            .map_err(io(&meta_path))?;
        let changes_path = partial.join(CHANGES_FILE);
        let changes = taken.clone().unwrap_or_default();
        std::fs::write(&changes_path, changes.encode()).map_err(io(&changes_path))?;
        snapshot::write_state(partial, &state)
            .map_err(|e| CheckpointError::Other(e.to_string()))?;
        std::fs::rename(partial, &done.path).map_err(io(partial))?;
        sync_dir(dir)?;
        Ok(())
    }

    /// Writes the slot's changed pages and blocks into its files and clears its set.
    fn copy_changes(
        &mut self,
        slot: usize,
        src: &Source,
        disks: &[DiskView],
        memory: &File,
        disk_files: &[File],
    ) -> Result<u64, CheckpointError> {
        let s = &mut self.slots[slot];
        let mut written = 0;
        {
            use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};
            let ram = src.parts.vm.ram();
            let mut page = vec![0u8; PAGE as usize];
            let mut file_off = 0;
            for (region, bitmap) in ram.iter().zip(&s.pages) {
                for_each_bit(bitmap, |i| {
                    let off = i * PAGE;
                    ram.read_slice(&mut page, GuestAddress(region.start_addr().0 + off))
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    memory.write_all_at(&page, file_off + off)?;
                    written += PAGE;
                    Ok(())
                })
                .map_err(|e| CheckpointError::Other(format!("memory: {e}")))?;
                file_off += region.len();
            }
        }
        let mut block = vec![0u8; DIRTY_BLOCK as usize];
        for ((d, out), bitmap) in disks.iter().zip(disk_files).zip(&s.blocks) {
            let len = d.file.metadata().map_err(io(&d.path))?.len();
            for_each_bit(bitmap, |i| {
                let off = i * DIRTY_BLOCK;
                let n = DIRTY_BLOCK.min(len.saturating_sub(off)) as usize;
                d.file.read_exact_at(&mut block[..n], off)?;
                out.write_all_at(&block[..n], off)?;
                written += n as u64;
                Ok(())
            })
            .map_err(io(&d.path))?;
        }
        s.clear();
        Ok(written)
    }
}

fn for_each_bit(
    bitmap: &[u64],
    mut f: impl FnMut(u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for (word_i, word) in bitmap.iter().enumerate() {
        let mut w = *word;
        while w != 0 {
            let bit = u64::from(w.trailing_zeros());
            w &= w - 1;
            f(word_i as u64 * 64 + bit)?;
        }
    }
    Ok(())
}

fn create_sized(path: &Path, len: u64) -> Result<File, CheckpointError> {
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(len).map_err(io(path))?;
    Ok(f)
}

/// The checkpoint a VM resumes from, taken out of the rotation.
#[derive(Debug)]
pub struct Chosen {
    /// `DIR/resumed-<seq>`: restore from here.
    pub dir: PathBuf,
    pub meta: Meta,
    /// Newer checkpoints that could not be used, and why.
    pub skipped: Vec<String>,
    /// The older ones, out of the rotation: for [`remove_later`] once the guest runs.
    pub discarded: Vec<PathBuf>,
}

/// Removes checkpoints taken out of the rotation, on a thread of its own (under the VMM's
/// filter once the filters are on): the guest need not wait for it. If the process ends first,
/// the next checkpoint of the VM removes what is left.
pub fn remove_later(paths: Vec<PathBuf>) {
    if paths.is_empty() {
        return;
    }
    let spawned = crate::seccomp::spawn(
        crate::seccomp::Kind::Vmm,
        "ckpt-discard".into(),
        move || {
            for p in paths {
                if let Err(e) = std::fs::remove_dir_all(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove an old checkpoint");
                }
            }
        },
    );
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "old checkpoints left for the next checkpoint to remove");
    }
}

/// Picks the newest usable checkpoint in `dir`, takes it (renamed `resumed-<seq>`, so no other
/// VMM uses it), rolls the VM's writable disks back to its copies (a rename into place where
/// the filesystem allows, else a copy), and takes the older ones out of the rotation (they
/// belong to the timeline the resumed guest leaves; [`remove_later`] removes them). A checkpoint is unusable when its state does not read back whole
/// (magic, version, CRC), or its memory or a disk copy is missing or of the wrong size.
pub fn choose_and_roll_back(dir: &Path) -> Result<Chosen, CheckpointError> {
    let mut skipped = Vec::new();
    for (seq, path) in published(dir) {
        let name = slot_name(seq);
        match check(&path) {
            Ok((meta, disks)) => {
                let taken = dir.join(format!("{RESUMED_PREFIX}{seq:020}"));
                std::fs::rename(&path, &taken).map_err(io(&path))?;
                for (i, live) in disks.iter().enumerate() {
                    roll_back(&disk_file(&taken, i), live)?;
                }
                let mut discarded = Vec::new();
                for (seq, older) in published(dir) {
                    let out = dir.join(format!("{DISCARDED_PREFIX}{seq:020}"));
                    match std::fs::rename(&older, &out) {
                        Ok(()) => discarded.push(out),
                        Err(e) => {
                            tracing::warn!(path = %older.display(), error = %e, "cannot discard an old checkpoint")
                        }
                    }
                }
                sync_dir(dir)?;
                return Ok(Chosen {
                    dir: taken,
                    meta,
                    skipped,
                    discarded,
                });
            }
            Err(why) => {
                tracing::warn!(checkpoint = name, error = %why, "checkpoint not usable");
                skipped.push(format!("{name}: {why}"));
            }
        }
    }
    Err(CheckpointError::NoneUsable {
        dir: dir.into(),
        skipped,
    })
}

/// A published checkpoint's record and the live disks its copies belong to, if it is whole.
pub(crate) fn check(slot: &Path) -> Result<(Meta, Vec<PathBuf>), String> {
    let state = snapshot::read_state(slot).map_err(|e| e.to_string())?;
    snapshot::open_memory(slot, state.config.memory_bytes()).map_err(|e| e.to_string())?;
    let meta: Meta = std::fs::read(slot.join(META_FILE))
        .map_err(|e| format!("{META_FILE}: {e}"))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{META_FILE}: {e}")))?;
    let mut live = Vec::new();
    for d in state.config.devices.disks.iter().filter(|d| !d.read_only) {
        let copy = disk_file(slot, live.len());
        let len = std::fs::metadata(&copy)
            .map_err(|e| format!("{}: {e}", copy.display()))?
            .len();
        if let Ok(m) = std::fs::metadata(&d.path) {
            if m.len() != len {
                return Err(format!(
                    "{} is {len} bytes; the disk {} is {}",
                    copy.display(),
                    d.path.display(),
                    m.len()
                ));
            }
        }
        live.push(d.path.clone());
    }
    Ok((meta, live))
}

/// The disk at `live` becomes the checkpoint's copy at `copy`.
fn roll_back(copy: &Path, live: &Path) -> Result<(), CheckpointError> {
    if std::fs::rename(copy, live).is_ok() {
        return Ok(());
    }
    // Another filesystem, or the disk is a mount point of its own (a jail binds it): copied.
    let src = File::open(copy).map_err(io(copy))?;
    let len = src.metadata().map_err(io(copy))?.len();
    let out = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(live)
        .map_err(io(live))?;
    out.set_len(len).map_err(io(live))?;
    snapshot::copy_extents(&src, &out, len).map_err(io(live))?;
    out.sync_all().map_err(io(live))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_as_numbers_and_parse_back() {
        assert!(slot_name(9) < slot_name(10));
        assert_eq!(published_seq(&slot_name(42)), Some(42));
        assert_eq!(published_seq(&format!("{}{PARTIAL}", slot_name(42))), None);
        assert_eq!(any_seq(&format!("{}{PARTIAL}", slot_name(42))), Some(42));
        assert_eq!(any_seq(&format!("{RESUMED_PREFIX}{:020}", 7)), Some(7));
        assert_eq!(any_seq(&format!("{DISCARDED_PREFIX}{:020}", 6)), Some(6));
        assert_eq!(any_seq("memory.bin"), None);
    }

    #[test]
    fn changes_are_added_to_every_slot() {
        let mut a = vec![vec![0b01u64]];
        or_into(&mut a, &[vec![0b10, 0b1]]);
        assert_eq!(a, vec![vec![0b11, 0b1]]);
        let mut empty: Vec<Vec<u64>> = Vec::new();
        or_into(&mut empty, &[vec![5, 6], vec![1]]);
        assert_eq!(empty, vec![vec![5, 6], vec![1]]);
        let mut bits = Vec::new();
        for_each_bit(&[0b101, 1 << 63], |i| {
            bits.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(bits, vec![0, 2, 127]);
    }
}
