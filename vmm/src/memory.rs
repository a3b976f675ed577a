//! Guest RAM: one memfd (later a file on shared storage) mapped into the VMM and registered with KVM.
//! RAM is split around the 32-bit MMIO hole, so the guest sees up to two RAM blocks.

use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest RAM with a dirty bitmap per region: every write the VMM makes through vm-memory (used
/// rings, descriptor-chain writers) sets it, and [`mark_dirty`] covers the raw writes (vectored I/O
/// straight into guest buffers, balloon discards). KVM's dirty log only sees the vCPUs' writes;
/// live migration needs both.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM as the VM and its devices hold it: each access loads the current map (`memory()`, a
/// cheap RCU-style load), so regions added while the VM runs (memory hotplug) are seen by every
/// device without restarting it.
pub type SharedMemory = vm_memory::GuestMemoryAtomic<GuestMemory>;

/// Records that the VMM wrote `len` bytes of guest memory at `addr` (outside vm-memory's accessors).
pub fn mark_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    if let Some((region, offset)) = mem.to_region_addr(addr) {
        region.bitmap().mark_dirty(offset.0 as usize, len);
    }
}

/// Per region, the pages the VMM wrote since the last call (reading clears them), in the same
/// layout as KVM's dirty log: bit `i` of word `i / 64` is page `i` of the region.
pub fn take_vmm_dirty(mem: &GuestMemory) -> Vec<Vec<u64>> {
    // The region's own bitmap (through MmapRegion), not the slice view GuestMemoryRegion gives.
    mem.iter()
        .map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset())
        .collect()
}

/// What guest RAM is a mapping of.
pub enum Backing {
    /// A fresh VM: a shared memfd.
    Memfd(File),
    /// A restored VM: a private mapping of the snapshot's memory file.
    Snapshot(File),
}

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {err}")]
    Truncate { size: u64, err: std::io::Error },
    #[error("{requested} MiB of guest memory is more than this host has ({host} MiB)")]
    MoreThanHost { requested: u64, host: u64 },
    #[error("cannot map {size} MiB of guest memory: {err}")]
    Map { size: u64, err: String },
}

/// Guest physical RAM ranges `(start, len)` for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Creates `size` bytes of guest RAM backed by a memfd, mapped shared so that a snapshot or a
/// migration can later hand the same pages over as a file.
pub fn create_guest_memory(size: u64) -> Result<(GuestMemory, File), MemoryError> {
    // Memory is mapped lazily, so an impossible size would only fail when the guest touches it.
    if let Some(host) = host_memory_bytes() {
        if size > host {
            return Err(MemoryError::MoreThanHost {
                requested: size >> 20,
                host: host >> 20,
            });
        }
    }
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked before use.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created, owned file descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|err| MemoryError::Truncate { size, err })?;

    let mut offset = 0u64;
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| {
            let fo = file.try_clone().map(|f| FileOffset::new(f, offset));
            offset += len as u64;
            fo.map(|fo| (addr, len, Some(fo)))
        })
        .collect::<Result<_, _>>()
        .map_err(MemoryError::Memfd)?;
    let mem = GuestMemory::from_ranges_with_files(ranges).map_err(|e| MemoryError::Map {
        size: size >> 20,
        err: e.to_string(),
    })?;
    Ok((mem, file))
}

/// Maps a snapshot's memory file privately: pages load lazily on first touch and the guest's
/// writes stay in this process, so restore cost does not grow with memory size and the snapshot is
/// never modified.
pub fn map_snapshot_memory(file: &File, size: u64) -> Result<GuestMemory, MemoryError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::GuestRegionMmap;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        let map_err = |e: String| MemoryError::Map {
            size: size >> 20,
            err: e,
        };
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(region, addr).ok_or_else(|| map_err("region overflows".into()))?,
        );
        offset += len as u64;
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Map {
        size: size >> 20,
        err: e.to_string(),
    })
}

/// Total guest RAM in bytes.
pub fn size(mem: &GuestMemory) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(GuestMemoryRegion::len).sum()
}

/// The host's physical memory (MemTotal), if /proc/meminfo says.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn splits_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_HOLE_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn memory_is_usable() {
        let (mem, _f) = create_guest_memory(8 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn vmm_writes_are_tracked_dirty() {
        let (mem, _f) = create_guest_memory(1 << 20).unwrap();
        assert!(take_vmm_dirty(&mem)[0].iter().all(|w| *w == 0));
        // Through vm-memory (as virtio-queue writes used rings) and by hand (raw vectored I/O).
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        mark_dirty(&mem, GuestAddress(0x9ff0), 0x20);
        let bits = take_vmm_dirty(&mem);
        let pages: Vec<usize> = (0..256)
            .filter(|p| bits[0][p / 64] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(pages, vec![5, 9, 10]);
        assert!(
            take_vmm_dirty(&mem)[0].iter().all(|w| *w == 0),
            "reading did not clear"
        );
    }
}
