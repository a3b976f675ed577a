//! The register state a vCPU starts in: flat GDT, identity page tables and the entry registers of the
//! two boot protocols (PVH: 32-bit protected mode, paging off; Linux 64-bit: long mode, identity map).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{BOOT_GDT_START, PDPT_START, PD_START, PML4_START};
use crate::memory::GuestMemory;

/// Selectors in the boot GDT. The Linux 64-bit boot protocol wants __BOOT_CS = 0x10 and
/// __BOOT_DS = 0x18; PVH wants any flat 32-bit code segment.
pub const CODE32_SEL: u16 = 0x08;
pub const CODE64_SEL: u16 = 0x10;
pub const DATA_SEL: u16 = 0x18;
pub const TSS_SEL: u16 = 0x20;

const GDT: [u64; 5] = [
    0,                     // null
    0x00cf_9b00_0000_ffff, // code, 32-bit, flat
    0x00af_9b00_0000_ffff, // code, 64-bit
    0x00cf_9300_0000_ffff, // data, flat
    0x0000_8b00_0000_0067, // TSS, 32-bit busy, limit 0x67, byte granular
];

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start_info address.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity map, `rsi` = zero page address.
    Linux64,
}

/// Decodes a GDT descriptor into KVM's segment form.
fn segment(sel: u16) -> kvm_segment {
    let d = GDT[usize::from(sel >> 3)];
    let base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    let limit_raw = ((d & 0xffff) | (((d >> 48) & 0xf) << 16)) as u32;
    let g = ((d >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: sel,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and, for 64-bit entry, identity page tables for the first 4 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemory, mode: EntryMode) -> Result<(), GuestMemoryError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    if mode == EntryMode::Linux64 {
        mem.write_obj(PDPT_START | 0x3, GuestAddress(PML4_START))?;
        for pdpt_i in 0..4u64 {
            let pd = PD_START + pdpt_i * 0x1000;
            mem.write_obj(pd | 0x3, GuestAddress(PDPT_START + pdpt_i * 8))?;
            for i in 0..512u64 {
                let phys = (pdpt_i << 30) | (i << 21);
                // present | writable | page size (2 MiB)
                mem.write_obj(phys | 0x83, GuestAddress(pd + i * 8))?;
            }
        }
    }
    Ok(())
}

/// Special registers for `mode`, starting from what KVM reports.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let code = segment(if mode == EntryMode::Pvh {
        CODE32_SEL
    } else {
        CODE64_SEL
    });
    let data = segment(DATA_SEL);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SEL);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers at entry. `boot_info` is the start_info (PVH) or zero page (Linux64) address.
pub fn boot_regs(entry: u64, boot_info: u64, mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = boot_info,
        EntryMode::Linux64 => regs.rsi = boot_info,
    }
    regs
}

/// Sets the boot-time register state on a vCPU.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    entry: u64,
    boot_info: u64,
    mode: EntryMode,
) -> Result<(), kvm_ioctls::Error> {
    let sregs = boot_sregs(vcpu.get_sregs()?, mode);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&boot_regs(entry, boot_info, mode))?;
    setup_fpu(vcpu)
}

/// x87 control word and MXCSR at their power-on values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
}

/// LAPIC: LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode() {
        let c = segment(CODE64_SEL);
        assert_eq!((c.l, c.db, c.present, c.type_, c.s), (1, 0, 1, 0xb, 1));
        let c32 = segment(CODE32_SEL);
        assert_eq!((c32.l, c32.db, c32.limit, c32.base), (0, 1, 0xffff_ffff, 0));
        let t = segment(TSS_SEL);
        assert_eq!((t.type_, t.s, t.limit), (0xb, 0, 0x67));
    }

    #[test]
    fn identity_map_covers_4g() {
        let (mem, _f) =
            crate::memory::create_guest_memory(crate::memory::Layout::fixed(1 << 20)).unwrap();
        write_boot_tables(&mem, EntryMode::Linux64).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress(PD_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(pde, (3 << 30) | (511 << 21) | 0x83);
    }
}
