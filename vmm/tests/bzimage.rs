//! The bzImage path, checked without running the kernel: loading Debian's cloud kernel fills the
//! zero page as the Linux boot protocol (Documentation/arch/x86/boot.rst) requires.
//! Needs images/out/vmlinuz and initramfs.cpio.gz from `images/build.sh`.

mod common;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::layout::{ACPI_START, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use vmm::arch::regs::EntryMode;
use vmm::boot::{self, BootParams};

fn image(name: &str) -> std::path::PathBuf {
    let p = common::repo_root().join("images/out").join(name);
    assert!(
        p.exists(),
        "{} is missing: run images/build.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

#[test]
fn debian_bzimage_fills_boot_params() {
    let kernel = image("vmlinuz");
    let initrd = image("initramfs.cpio.gz");
    let file = std::fs::read(&kernel).unwrap();
    let initrd_bytes = std::fs::read(&initrd).unwrap();
    let cmdline = "console=ttyS0 reboot=k panic=-1 guest.scenario=poweroff";
    let mem_size = 512u64 << 20;
    let (mem, _f) = vmm::memory::create_guest_memory(vmm::memory::Layout::fixed(mem_size)).unwrap();

    let entry = boot::load(&mem, &kernel, Some(&initrd), cmdline, ACPI_START, mem_size).unwrap();
    assert_eq!(entry.mode, EntryMode::Linux64);
    assert_eq!(entry.boot_info, ZERO_PAGE_START);
    assert_eq!(
        entry.entry,
        HIMEM_START + 0x200,
        "64-bit entry is startup_64 at load + 0x200"
    );

    let p: BootParams = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    let hdr: setup_header = p.0.hdr;
    let (header, boot_flag, loader) = (hdr.header, hdr.boot_flag, hdr.type_of_loader);
    assert_eq!(header, 0x5372_6448, "HdrS magic");
    assert_eq!(boot_flag, 0xaa55);
    assert_eq!(loader, 0xff, "type_of_loader: undefined boot loader");
    // The setup header is the kernel's own (offset 0x1f1 in the file), apart from loader fields.
    let setup_sects = file[0x1f1];
    assert_eq!(hdr.setup_sects, setup_sects);
    let version = u16::from_le_bytes([file[0x206], file[0x207]]);
    let hv = hdr.version;
    assert_eq!(hv, version);
    assert!(
        version >= 0x020c,
        "boot protocol {version:#x} too old for 64-bit entry"
    );

    // Command line: pointer, size, and the bytes in guest memory.
    let (ptr, size) = (hdr.cmd_line_ptr, hdr.cmdline_size);
    assert_eq!(u64::from(ptr), CMDLINE_START);
    assert_eq!(size as usize, cmdline.len() + 1);
    let mut buf = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
        .unwrap();
    assert_eq!(&buf[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(buf[cmdline.len()], 0);

    // Initrd: page aligned, inside RAM, above the kernel's decompression area, bytes intact.
    let (rd, rd_size) = (hdr.ramdisk_image, hdr.ramdisk_size);
    assert_eq!(rd_size as usize, initrd_bytes.len());
    assert_eq!(rd % 4096, 0);
    let init_size = hdr.init_size;
    assert!(
        u64::from(rd) >= HIMEM_START + u64::from(init_size),
        "initrd overlaps the kernel"
    );
    let max = hdr.initrd_addr_max;
    assert!(u64::from(rd) + u64::from(rd_size) <= u64::from(max) + 1);
    assert!(u64::from(rd) + u64::from(rd_size) <= mem_size);
    let mut got = vec![0u8; initrd_bytes.len()];
    mem.read_slice(&mut got, GuestAddress(u64::from(rd)))
        .unwrap();
    assert!(got == initrd_bytes, "initrd bytes differ in guest memory");

    // e820: low RAM, the reserved ACPI area, RAM from 1 MiB to the end.
    let n = p.0.e820_entries as usize;
    let table: Vec<(u64, u64, u32)> = p.0.e820_table[..n]
        .iter()
        .map(|e| (e.addr, e.size, e.r#type))
        .collect();
    assert_eq!(table, boot::memory_map(mem_size));
    assert_eq!(
        table.iter().filter(|e| e.2 == 1).map(|e| e.1).sum::<u64>(),
        mem_size - (HIMEM_START - 0x9fc00)
    );
    let rsdp = p.0.acpi_rsdp_addr;
    assert_eq!(rsdp, ACPI_START);

    // The protected-mode kernel sits at 1 MiB, copied from after the setup sectors.
    let pm_offset = (usize::from(setup_sects) + 1) * 512;
    let mut code = vec![0u8; 4096];
    mem.read_slice(&mut code, GuestAddress(HIMEM_START))
        .unwrap();
    assert!(code[..] == file[pm_offset..pm_offset + 4096]);
}

#[test]
fn vmlinux_elf_uses_its_pvh_note() {
    let kernel = image("vmlinux");
    let (mem, _f) =
        vmm::memory::create_guest_memory(vmm::memory::Layout::fixed(256 << 20)).unwrap();
    let entry = boot::load(&mem, &kernel, None, "console=ttyS0", ACPI_START, 256 << 20).unwrap();
    assert_eq!(entry.mode, EntryMode::Pvh);
    assert!(
        entry.entry > HIMEM_START && entry.entry < 1 << 32,
        "{:#x}",
        entry.entry
    );
}
