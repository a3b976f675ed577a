//! Guest RAM: one memfd (later a file on shared storage) mapped into the VMM and registered with KVM.
//! Boot RAM is split around the 32-bit MMIO hole, so the guest sees up to two RAM blocks; a VM that
//! can grow (`--max-memory-mib`) has a third region above them, the virtio-mem device's, which the
//! guest uses only as the device plugs blocks of it.

use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::{memory_hotplug_start, MMIO_HOLE_END, MMIO_HOLE_START};

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

/// Where guest RAM lies: the boot RAM and the hotplug (virtio-mem) region after it. The memory file
/// holds the regions back to back in this order, so its size is [`Layout::total`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// RAM the guest has from boot (the e820 map lists it).
    pub boot: u64,
    /// Size of the virtio-mem region (0: the VM cannot grow).
    pub hotplug: u64,
}

impl Layout {
    /// A VM without a hotplug region.
    pub fn fixed(boot: u64) -> Layout {
        Layout { boot, hotplug: 0 }
    }

    pub fn total(&self) -> u64 {
        self.boot + self.hotplug
    }

    /// Where the hotplug region starts in guest physical memory.
    pub fn hotplug_start(&self) -> u64 {
        memory_hotplug_start(self.boot)
    }

    /// The guest physical ranges `(start, len)` of every region, in file order.
    pub fn ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut r = ram_ranges(self.boot);
        if self.hotplug > 0 {
            r.push((GuestAddress(self.hotplug_start()), self.hotplug as usize));
        }
        r
    }
}

/// Creates guest RAM laid out as `layout`, backed by a memfd, mapped shared so that a snapshot or a
/// migration can later hand the same pages over as a file.
pub fn create_guest_memory(layout: Layout) -> Result<(GuestMemory, File), MemoryError> {
    let size = layout.total();
    // Memory is mapped lazily, so an impossible size would only fail when the guest touches it.
    // The hotplug region is only address space until plugged (placement decides what fits).
    if let Some(host) = host_memory_bytes() {
        if layout.boot > host {
            return Err(MemoryError::MoreThanHost {
                requested: layout.boot >> 20,
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
    let ranges: Vec<_> = layout
        .ranges()
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
    advise_huge_pages(&mem);
    Ok((mem, file))
}

/// Asks for transparent huge pages behind guest RAM: one host fault and one (nested) page-table
/// entry per 2 MiB instead of 512, which is most of the cost of a guest touching fresh memory
/// (booting, onlining hot-plugged memory) under nested virtualization. For a memfd the host
/// must allow it (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`: `advise` or `always`;
/// `scripts/setup.sh` sets `advise`); otherwise this changes nothing.
fn advise_huge_pages(mem: &GuestMemory) {
    for region in mem.iter() {
        // SAFETY: the region is one live mapping of `len` bytes; MADV_HUGEPAGE only changes how
        // the kernel backs it, never its contents.
        let r = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for guest memory");
        }
    }
}

/// Maps a snapshot's memory file privately: pages load lazily on first touch and the guest's
/// writes stay in this process, so restore cost does not grow with memory size and the snapshot is
/// never modified.
pub fn map_snapshot_memory(file: &File, layout: Layout) -> Result<GuestMemory, MemoryError> {
    let size = layout.total();
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::GuestRegionMmap;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in layout.ranges() {
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

/// Gives the host pages behind guest range `addr..addr+len` back (virtio-mem unplug, balloon
/// inflate): afterwards it reads as zeros and uses no host memory until touched. Guest RAM is a
/// shared memfd mapping, where `MADV_DONTNEED` would only drop the mapping and keep the file's
/// pages, so `MADV_REMOVE` punches them out of the file; a restored VM's private mapping of its
/// snapshot cannot punch the snapshot, so there its own copies are dropped instead. The range is
/// marked dirty: a migration must carry the change over.
pub fn discard(mem: &GuestMemory, addr: GuestAddress, len: usize) -> Result<(), String> {
    let start = mem
        .get_host_address(addr)
        .map_err(|_| format!("{:#x} is outside guest memory", addr.0))?;
    let last = addr
        .0
        .checked_add(len as u64 - 1)
        .ok_or_else(|| "range overflows".to_string())?;
    let end = mem
        .get_host_address(GuestAddress(last))
        .map_err(|_| format!("{last:#x} is outside guest memory"))?;
    if end as usize != start as usize + len - 1 {
        return Err(format!("{:#x}+{len:#x} straddles two regions", addr.0));
    }
    // SAFETY: `start..start+len` lies inside one live guest memory mapping (both ends checked
    // above); discarding only changes the pages' contents to zeros, which the guest has given up.
    let r = unsafe { libc::madvise(start.cast(), len, libc::MADV_REMOVE) };
    if r != 0 {
        // SAFETY: as above.
        let r = unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    mark_dirty(mem, addr, len);
    Ok(())
}

/// Total guest RAM in bytes (the hotplug region included).
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
    fn the_hotplug_region_follows_boot_ram_in_the_file() {
        let l = Layout {
            boot: 64 << 20,
            hotplug: 256 << 20,
        };
        assert_eq!(
            l.ranges(),
            vec![
                (GuestAddress(0), 64 << 20),
                (GuestAddress(MMIO_HOLE_END), 256 << 20)
            ]
        );
        let (mem, _f) = create_guest_memory(l).unwrap();
        assert_eq!(size(&mem), 320 << 20);
    }

    #[test]
    fn discarded_memory_reads_as_zeros_and_leaves_the_file() {
        let (mem, f) = create_guest_memory(Layout::fixed(8 << 20)).unwrap();
        let blocks = |f: &File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().blocks()
        };
        mem.write_slice(&[7u8; 2 << 20], GuestAddress(2 << 20))
            .unwrap();
        let before = blocks(&f);
        take_vmm_dirty(&mem);
        discard(&mem, GuestAddress(2 << 20), 2 << 20).unwrap();
        assert!(blocks(&f) + 4000 <= before, "{} -> {}", before, blocks(&f));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 << 20)).unwrap(), 0);
        assert!(take_vmm_dirty(&mem)[0].iter().any(|w| *w != 0));
        assert!(discard(&mem, GuestAddress(7 << 20), 2 << 20).is_err());
    }

    #[test]
    fn memory_is_usable() {
        let (mem, _f) = create_guest_memory(Layout::fixed(8 << 20)).unwrap();
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
        let (mem, _f) = create_guest_memory(Layout::fixed(1 << 20)).unwrap();
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
