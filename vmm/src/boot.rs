//! Kernel loading: an ELF (entered through its PVH note when it has one, else the 64-bit Linux entry)
//! or a bzImage (64-bit Linux boot protocol), with the command line, initrd and memory map the
//! protocol hands over.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryError};

use crate::arch::layout::*;
use crate::arch::regs::EntryMode;
use crate::memory::GuestMemory;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel {0}: {1}")]
    OpenKernel(PathBuf, std::io::Error),
    #[error("kernel {path} is not in a supported format (ELF or bzImage): {reason}")]
    KernelFormat { path: PathBuf, reason: String },
    #[error("cannot load kernel {path}: {reason}")]
    LoadKernel { path: PathBuf, reason: String },
    #[error("cannot read initrd {0}: {1}")]
    ReadInitrd(PathBuf, std::io::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end ({kernel_end:#x}) and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("invalid command line: {0}")]
    Cmdline(String),
    #[error("guest memory too small for the boot structures")]
    Memory(#[from] GuestMemoryError),
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: u64,
    /// Address of the PVH start_info or the Linux zero page.
    pub boot_info: u64,
    pub mode: EntryMode,
}

/// `boot_params` as a plain byte structure for guest memory writes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct BootParams(pub boot_params);
// SAFETY: boot_params is a packed C struct of integers; every bit pattern is valid.
unsafe impl ByteValued for BootParams {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain C struct of integers.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: plain C struct of integers.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: plain C struct of integers.
unsafe impl ByteValued for ModlistEntry {}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1 << 0;
const PVH_START_MAGIC: u32 = 0x336e_c578;

/// The guest memory map: `(start, size, e820 type)`.
pub fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, LOW_RAM_END, E820_RAM),
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_size > MMIO_HOLE_START {
        map.push((MMIO_HOLE_END, mem_size - MMIO_HOLE_START, E820_RAM));
    }
    map
}

/// The kernel file's format, told by its first bytes.
fn is_elf(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Loads the kernel, command line and initrd; writes the boot information structures. ACPI tables
/// are written separately; `rsdp` is their root. `mem_size` is the boot RAM, which the memory map
/// lists (a hotplug region in `mem` is not the guest's until its device plugs it).
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
    mem_size: u64,
) -> Result<BootEntry, BootError> {
    let mut file = File::open(kernel).map_err(|e| BootError::OpenKernel(kernel.into(), e))?;
    let elf = is_elf(&mut file).map_err(|e| BootError::OpenKernel(kernel.into(), e))?;
    let loaded = if elf {
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::LoadKernel {
                path: kernel.into(),
                reason: e.to_string(),
            }
        })?
    } else {
        BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::KernelFormat {
                path: kernel.into(),
                reason: format!("not an ELF, and as a bzImage: {e}"),
            }
        })?
    };
    write_cmdline(mem, cmdline)?;
    // linux-loader reports `kernel_end` as an absolute guest address.
    let kernel_end = loaded.kernel_end;

    match (elf, loaded.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => {
            let initrd = match initrd {
                Some(p) => Some(load_initrd(
                    mem,
                    p,
                    kernel_end,
                    u64::from(u32::MAX).min(mem_size),
                )?),
                None => None,
            };
            write_start_info(mem, mem_size, rsdp, initrd)?;
            Ok(BootEntry {
                entry: entry.raw_value(),
                boot_info: PVH_INFO_START,
                mode: EntryMode::Pvh,
            })
        }
        _ => {
            let entry = linux64_entry(&loaded, elf, kernel)?;
            let limit = loaded
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max) + 1)
                .unwrap_or(u64::from(u32::MAX));
            // The decompressor works in place up to `init_size` past the load address.
            let kernel_end = loaded
                .setup_header
                .map(|h| loaded.kernel_load.raw_value() + u64::from(h.init_size))
                .unwrap_or(0)
                .max(kernel_end);
            let initrd = match initrd {
                Some(p) => Some(load_initrd(mem, p, kernel_end, limit.min(mem_size))?),
                None => None,
            };
            let params = zero_page(&loaded, mem_size, cmdline, rsdp, initrd);
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
            Ok(BootEntry {
                entry,
                boot_info: ZERO_PAGE_START,
                mode: EntryMode::Linux64,
            })
        }
    }
}

/// The 64-bit entry point: the ELF entry, or `startup_64` 0x200 bytes into a bzImage's protected-mode
/// code.
fn linux64_entry(loaded: &KernelLoaderResult, elf: bool, path: &Path) -> Result<u64, BootError> {
    if elf {
        return Ok(loaded.kernel_load.raw_value());
    }
    let hdr = loaded.setup_header.ok_or_else(|| BootError::KernelFormat {
        path: path.into(),
        reason: "bzImage without a setup header".into(),
    })?;
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::KernelFormat {
            path: path.into(),
            reason: "bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)".into(),
        });
    }
    Ok(loaded.kernel_load.raw_value() + 0x200)
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))?;
    Ok(())
}

/// Places the initrd at the highest page-aligned address that ends below `limit` and the end of low
/// RAM, and above the kernel. Returns `(address, size)`.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::ReadInitrd(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::ReadInitrd(path.into(), e))?
        .len();
    let top = limit.min(MMIO_HOLE_START);
    let too_large = || BootError::InitrdTooLarge {
        path: path.into(),
        size,
        kernel_end,
        limit: top,
    };
    let start = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd(path.into(), std::io::Error::other(e.to_string())))?;
    Ok((start, size))
}

/// The Linux zero page for the 64-bit boot protocol.
pub fn zero_page(
    loaded: &KernelLoaderResult,
    mem_size: u64,
    cmdline: &str,
    rsdp: u64,
    initrd: Option<(u64, u64)>,
) -> BootParams {
    let mut params = BootParams::default();
    let p = &mut params.0;
    if let Some(hdr) = loaded.setup_header {
        p.hdr = hdr;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = HDRS_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = rsdp;
    let map = memory_map(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    p.e820_entries = map.len() as u8;
    params
}

fn write_start_info(
    mem: &GuestMemory,
    mem_size: u64,
    rsdp: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = memory_map(mem_size);
    let memmap_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr =
        memmap_addr + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let e = MemmapEntry(hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        });
        mem.write_obj(e, GuestAddress(memmap_addr + (i * 24) as u64))?;
    }
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let m = ModlistEntry(hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        });
        mem.write_obj(m, GuestAddress(modlist_addr))?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_has_holes() {
        let m = memory_map(128 << 20);
        assert_eq!(m[0], (0, LOW_RAM_END, E820_RAM));
        assert_eq!(m[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
        let big = memory_map(4 << 30);
        assert_eq!(
            big.last().unwrap(),
            &(MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START, E820_RAM)
        );
    }

    #[test]
    fn rejects_garbage_kernel() {
        let (mem, _f) =
            crate::memory::create_guest_memory(crate::memory::Layout::fixed(16 << 20)).unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("garbage");
        std::fs::write(&k, vec![0x42u8; 8192]).unwrap();
        let e = load(&mem, &k, None, "", 0, 16 << 20).unwrap_err();
        assert!(matches!(e, BootError::KernelFormat { .. }), "{e}");
        assert!(e.to_string().contains("garbage"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
