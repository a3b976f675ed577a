//! The guest physical address map. Everything the VMM places in guest memory has its address here.

/// Boot GDT (see `regs::gdt`).
pub const BOOT_GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables for 64-bit entry: PML4, PDPT, then four PDs (first 4 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// End of the low RAM block (the traditional EBDA starts here).
pub const LOW_RAM_END: u64 = 0x9fc00;
/// ACPI tables: the RSDP sits where legacy OSes scan for it (0xe0000..0x100000).
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole below 4 GiB: RAM stops at its start and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Memory added while the VM runs (hotplug) goes above all boot RAM, from the first 1 GiB boundary
/// after it and never below 4 GiB: it moves nothing the guest already has, and 1 GiB blocks suit
/// the guest's memory-block size and huge pages.
pub const MEMORY_HOTPLUG_ALIGN: u64 = 1 << 30;

/// Where hot-added memory starts for a VM booted with `boot_ram` bytes (RAM is split around the
/// MMIO hole: what does not fit below it continues at 4 GiB).
pub const fn memory_hotplug_start(boot_ram: u64) -> u64 {
    let end = if boot_ram <= MMIO_HOLE_START {
        boot_ram
    } else {
        MMIO_HOLE_END + (boot_ram - MMIO_HOLE_START)
    };
    let aligned = end.div_ceil(MEMORY_HOTPLUG_ALIGN) * MEMORY_HOTPLUG_ALIGN;
    if aligned < MMIO_HOLE_END {
        MMIO_HOLE_END
    } else {
        aligned
    }
}

/// virtio-mmio device windows, one 4 KiB page each, from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// ACPI Generic Event Device (power button, later CPU/memory hotplug): one event register.
pub const GED_START: u64 = 0xfeb0_0000;
pub const GED_SIZE: u64 = 0x1000;
/// The CPU hotplug controller's registers (devices/cpu_hotplug.rs).
pub const CPU_HOTPLUG_START: u64 = GED_START + GED_SIZE;
pub const CPU_HOTPLUG_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS (Intel only) just below the BIOS area.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 command port: 0xfe pulses the CPU reset line.
pub const I8042_CMD_PORT: u16 = 0x64;
/// ACPI hardware-reduced sleep control/status registers and the reset register.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
pub const ACPI_RESET_PORT: u16 = 0x3c2;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The `_S5_` sleep type the DSDT declares and the sleep device recognises.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// Debug-exit port for test guests: a byte written here ends the VMM with that byte as exit status.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// GSI of the Generic Event Device.
pub const GED_IRQ: u32 = 5;
/// First GSI handed to virtio-mmio devices.
pub const VIRTIO_IRQ_START: u32 = 16;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_added_memory_starts_above_boot_ram_on_a_gib() {
        const GIB: u64 = 1 << 30;
        assert_eq!(memory_hotplug_start(512 << 20), 4 * GIB);
        assert_eq!(memory_hotplug_start(3 * GIB), 4 * GIB);
        // 4 GiB of RAM: 3 below the hole, 1 from 4 GiB on.
        assert_eq!(memory_hotplug_start(4 * GIB), 5 * GIB);
        assert_eq!(memory_hotplug_start(4 * GIB + 1), 6 * GIB);
    }
}
