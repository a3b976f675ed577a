//! The snapshot format: a directory with `state.bin` (every component's state) and `memory.bin`
//! (guest RAM, region after region, as in the memfd). See docs/snapshot.md.
//!
//! `state.bin` is a header (magic, format version major.minor.patch, body length, CRC-32 of the
//! body) followed by the body (JSON of [`SnapshotState`]). A build reads every snapshot with its own
//! major version and a minor version up to its own; anything else is refused with both versions in
//! the message.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::VmConfig;
use crate::devices::cpu_hotplug::CpuHotplugState;
use crate::devices::ged::GedState;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::memory::{Backing, GuestMemory};
use crate::migration::Versioned;
use crate::vcpu::VcpuState;
use crate::vm::VmState;

pub const MAGIC: [u8; 8] = *b"FLEETSNP";
/// major, minor, patch.
pub const VERSION: [u16; 3] = [2, 1, 0];
const HEADER_LEN: usize = 8 + 6 + 8 + 4;
/// A state file is small (registers and device state); refuse anything absurd before allocating.
const MAX_BODY: u64 = 64 << 20;

pub const STATE_FILE: &str = vmm_api::SNAPSHOT_STATE_FILE;
pub const MEMORY_FILE: &str = vmm_api::SNAPSHOT_MEMORY_FILE;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is not a snapshot state file (bad magic)")]
    Magic(PathBuf),
    #[error("snapshot format version {found} is not readable by this build (reads {major}.0 to {major}.{minor})", major = VERSION[0], minor = VERSION[1])]
    Version { found: String },
    #[error("{0} is truncated: {1}")]
    Truncated(PathBuf, String),
    #[error("{path} is corrupt: CRC-32 {found:#010x}, expected {expected:#010x}")]
    Crc {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{0} is corrupt: {1}")]
    Decode(PathBuf, String),
    #[error("memory file {path} is {found} bytes; the VM has {expected}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("the snapshot's disk {0} is missing: {1}")]
    DiskMissing(PathBuf, std::io::Error),
}

/// Everything but guest memory: one tree, each component's state typed and versioned.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    pub config: VmConfig,
    pub vm: Versioned<VmState>,
    /// In vCPU index order.
    pub vcpus: Vec<Versioned<VcpuState>>,
    pub devices: DeviceStates,
}

/// The devices' states, each at its place: the configuration builds the same devices in the
/// same order, so nothing is looked up by name.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStates {
    pub serial: Versioned<SerialSnapshot>,
    pub ged: Versioned<GedState>,
    /// Since 2.1: the CPU hotplug controller's slots.
    #[serde(default)]
    pub cpu_hotplug: Option<Versioned<CpuHotplugState>>,
    /// In the order the devices are attached (disks, nets, rng, vsock, balloon).
    pub virtio: Vec<Versioned<TransportState>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Io(path.into(), e)
}

/// Writes `state.bin` durably (temporary file, fsync, rename).
pub fn write_state(dir: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let body = serde_json::to_vec(state)
        .map_err(|e| SnapshotError::Decode(path.clone(), e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    for v in VERSION {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&out).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// Reads and checks `state.bin`.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut f = File::open(&path).map_err(io(&path))?;
    let mut bytes = vec![0u8; HEADER_LEN];
    f.read_exact(&mut bytes)
        .map_err(|_| SnapshotError::Truncated(path.clone(), "shorter than its header".into()))?;
    // The body, no more than the header claims and never more than any state could be.
    let len = u64::from_le_bytes(bytes[14..22].try_into().unwrap_or([0; 8]));
    f.take(len.min(MAX_BODY))
        .read_to_end(&mut bytes)
        .map_err(io(&path))?;
    decode_state(&path, &bytes)
}

/// Checks and decodes the bytes of a `state.bin` (`path` names it in errors): magic, version,
/// length, CRC, then the JSON body. Whatever the bytes, an error, never a panic (fuzzed:
/// `vmm/fuzz`).
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let path = path.to_path_buf();
    let Some((header, rest)) = bytes.split_at_checked(HEADER_LEN) else {
        return Err(SnapshotError::Truncated(
            path,
            "shorter than its header".into(),
        ));
    };
    if header[..8] != MAGIC {
        return Err(SnapshotError::Magic(path));
    }
    let v = |i: usize| u16::from_le_bytes([header[8 + 2 * i], header[9 + 2 * i]]);
    let (major, minor, patch) = (v(0), v(1), v(2));
    if major != VERSION[0] || minor > VERSION[1] {
        return Err(SnapshotError::Version {
            found: format!("{major}.{minor}.{patch}"),
        });
    }
    let len = u64::from_le_bytes(header[14..22].try_into().unwrap_or([0; 8]));
    let crc = u32::from_le_bytes(header[22..26].try_into().unwrap_or([0; 4]));
    if len > MAX_BODY {
        return Err(SnapshotError::Decode(
            path,
            format!("body length {len} is implausible"),
        ));
    }
    if (rest.len() as u64) < len {
        return Err(SnapshotError::Truncated(
            path,
            format!("body has {} of {len} bytes", rest.len()),
        ));
    }
    let body = &rest[..len as usize];
    let found = crc32fast::hash(body);
    if found != crc {
        return Err(SnapshotError::Crc {
            path,
            found,
            expected: crc,
        });
    }
    serde_json::from_slice(body).map_err(|e| SnapshotError::Decode(path, e.to_string()))
}

/// Writes guest RAM to `memory.bin` durably. From a memfd only the data extents are copied (pages
/// never touched stay holes); from a restored VM's private mapping, all-zero pages are skipped.
pub fn write_memory(dir: &Path, mem: &GuestMemory, backing: &Backing) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let out = File::create(&tmp).map_err(io(&tmp))?;
    let size = crate::memory::size(mem);
    out.set_len(size).map_err(io(&tmp))?;
    let copied = copy_memory(mem, backing, &out).and_then(|_| out.sync_all());
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(SnapshotError::Io(tmp, e));
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(())
}

/// Copies guest RAM into `out` at the same offsets: from a memfd only its data extents, from a
/// private mapping the non-zero pages. `out` must already have the full size. Returns the bytes
/// written.
pub fn copy_memory(mem: &GuestMemory, backing: &Backing, out: &File) -> std::io::Result<u64> {
    match backing {
        Backing::Memfd(memfd) => copy_extents(memfd, out, crate::memory::size(mem)),
        Backing::Snapshot(file) => copy_nonzero_pages(mem, file, out),
    }
}

/// The `(start, end)` byte ranges of `file` that hold data (everything else is holes).
fn data_extents(file: &File, size: u64) -> Vec<(u64, u64)> {
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only holes remain
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) }.min(size as i64);
        extents.push((data as u64, hole as u64));
        pos = hole;
    }
    extents
}

/// Copies the data extents of `src` (its first `size` bytes) into `out` at the same offsets:
/// holes stay holes. Returns the bytes written.
pub(crate) fn copy_extents(src: &File, out: &File, size: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0;
    // In the kernel first: a reflink where the filesystem shares extents (XFS, btrfs), a copy on
    // the server over NFS 4.2. Read and written here where it cannot.
    let mut in_kernel = true;
    for (start, end) in data_extents(src, size) {
        let mut off = start;
        while in_kernel && off < end {
            let (mut from, mut to) = (off as i64, off as i64);
            // The system call itself: the static vmm's glibc resolves its `copy_file_range`
            // wrapper to nothing (a call through it jumped to address 0).
            // SAFETY: both descriptors are open files we own; the offsets are ours.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_copy_file_range,
                    src.as_raw_fd(),
                    &mut from as *mut i64,
                    out.as_raw_fd(),
                    &mut to as *mut i64,
                    (end - off) as usize,
                    0u32,
                )
            };
            match n {
                n if n > 0 => {
                    off += n as u64;
                    written += n as u64;
                }
                0 => break,
                _ => {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                            in_kernel = false
                        }
                        _ => return Err(e),
                    }
                }
            }
        }
        while off < end {
            let n = buf.len().min((end - off) as usize);
            src.read_exact_at(&mut buf[..n], off)?;
            out.write_all_at(&buf[..n], off)?;
            off += n as u64;
            written += n as u64;
        }
    }
    Ok(written)
}

/// A restored VM's memory: a page the guest wrote since the restore is its own (resident, in the
/// mapping); a page it never touched is still the snapshot file's, read from the file without
/// faulting it in, and skipped where the file has a hole (a never-used page, or an unplugged
/// virtio-mem block): faulting in every page of a mostly empty multi-GiB file would fill memory
/// with zeros. Only non-zero pages are written.
fn copy_nonzero_pages(mem: &GuestMemory, snapshot: &File, out: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    const PAGE: usize = 4096;
    let extents = data_extents(snapshot, crate::memory::size(mem));
    let in_file = |off: u64| {
        extents
            .binary_search_by(|&(a, b)| {
                if off < a {
                    std::cmp::Ordering::Greater
                } else if off >= b {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    };
    let mut page = [0u8; PAGE];
    let mut file_off = 0u64;
    let mut written = 0;
    for region in mem.iter() {
        let base = region.start_addr().0;
        let len = region.len() as usize;
        let mut resident = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: the region is one live, page-aligned mapping of `len` bytes; mincore only
        // writes one byte per page into `resident`, which has that many.
        let r = unsafe { libc::mincore(region.as_ptr().cast(), len, resident.as_mut_ptr()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (i, res) in resident.iter().enumerate() {
            let off = (i * PAGE) as u64;
            if res & 1 != 0 {
                mem.read_slice(&mut page, GuestAddress(base + off))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            } else if in_file(file_off + off) {
                snapshot.read_exact_at(&mut page, file_off + off)?;
            } else {
                continue;
            }
            if page.iter().any(|&b| b != 0) {
                out.write_all_at(&page, file_off + off)?;
                written += PAGE as u64;
            }
        }
        file_off += region.len();
    }
    Ok(written)
}

/// Opens `memory.bin` and checks it holds `size` bytes.
pub fn open_memory(dir: &Path, size: u64) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let found = f.metadata().map_err(io(&path))?.len();
    if found != size {
        return Err(SnapshotError::MemorySize {
            path,
            found,
            expected: size,
        });
    }
    Ok(f)
}

/// Checks what the snapshot needs from outside it: its disks (on shared storage, not in it).
pub fn check_external(state: &SnapshotState) -> Result<(), SnapshotError> {
    for d in &state.config.devices.disks {
        std::fs::metadata(&d.path).map_err(|e| SnapshotError::DiskMissing(d.path.clone(), e))?;
    }
    Ok(())
}
