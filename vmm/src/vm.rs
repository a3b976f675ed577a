//! The KVM VM: the /dev/kvm handle, the VM file descriptor, guest memory registered as memory slots,
//! and the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_START;
use crate::memory::{Backing, GuestMemory, MemoryError, SharedMemory};
use crate::migration::{MigrationError, Pausable, Snapshottable, State};

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmVersion(i32),
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot register guest memory with KVM: {0}")]
    MemorySlot(kvm_ioctls::Error),
    #[error("cannot set up {what}: {err}")]
    Setup {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    /// Guest RAM; `ram()` for the current map.
    pub memory: SharedMemory,
    /// The KVM memory slot of each RAM region, in region order. Slots are allocated, not tied to
    /// region indexes, so regions can be added (hotplug) without renumbering the others.
    slots: Vec<u32>,
    /// The file behind guest memory, kept for snapshot and migration.
    pub backing: Backing,
}

/// Registers the guest RAM regions as the KVM memory slots `slots` (one per region, in order) with
/// `flags`.
fn set_slots(
    fd: &VmFd,
    memory: &GuestMemory,
    slots: &[u32],
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    for (&slot, region) in slots.iter().zip(memory.iter()) {
        let r = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the Vm keeps for as long as
        // the VM fd exists.
        unsafe { fd.set_user_memory_region(r) }?;
    }
    Ok(())
}

/// Opens /dev/kvm and checks its API version.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::KvmVersion(v));
    }
    Ok(kvm)
}

impl Vm {
    /// A VM with fresh, memfd-backed memory laid out as `layout`.
    pub fn new(kvm: Kvm, layout: crate::memory::Layout) -> Result<Vm, VmError> {
        let (memory, file) = crate::memory::create_guest_memory(layout)?;
        Vm::with_memory(kvm, memory, Backing::Memfd(file))
    }

    /// A VM around existing guest memory (a restored snapshot's).
    pub fn with_memory(kvm: Kvm, memory: GuestMemory, backing: Backing) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let slots: Vec<u32> = (0..memory.num_regions() as u32).collect();
        set_slots(&fd, &memory, &slots, 0).map_err(VmError::MemorySlot)?;
        let setup = |what| move |err| VmError::Setup { what, err };
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(setup("the TSS address"))?;
        fd.create_irq_chip()
            .map_err(setup("the interrupt controllers"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("the PIT"))?;
        Ok(Vm {
            kvm,
            fd,
            memory: SharedMemory::new(memory),
            slots,
            backing,
        })
    }
}

impl Vm {
    /// Guest RAM as it is now.
    pub fn ram(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemory> {
        use vm_memory::GuestAddressSpace;
        self.memory.memory()
    }

    /// Turns KVM's dirty-page logging on or off for all of guest RAM.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), kvm_ioctls::Error> {
        set_slots(
            &self.fd,
            &self.ram(),
            &self.slots,
            if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        )
    }

    /// For each RAM region: its guest address, file offset, and the bitmap of 4 KiB pages dirtied
    /// since the last call (reading clears it), by the vCPUs (KVM's log) or by the VMM's devices.
    pub fn dirty_bitmaps(&self) -> Result<Vec<(u64, u64, Vec<u64>)>, kvm_ioctls::Error> {
        let mut offset = 0;
        let mut out = Vec::new();
        let ram = self.ram();
        let vmm_dirty = crate::memory::take_vmm_dirty(&ram);
        for (i, (&slot, region)) in self.slots.iter().zip(ram.iter()).enumerate() {
            let mut bitmap = self.fd.get_dirty_log(slot, region.len() as usize)?;
            if let Some(vmm) = vmm_dirty.get(i) {
                bitmap.iter_mut().zip(vmm).for_each(|(k, v)| *k |= v);
            }
            out.push((region.start_addr().raw_value(), offset, bitmap));
            offset += region.len();
        }
        Ok(out)
    }
}

impl Snapshottable for Vm {
    type State = VmState;

    fn save(&self) -> Result<VmState, MigrationError> {
        let err = |what: &str, e: kvm_ioctls::Error| MigrationError::Save {
            id: "vm".into(),
            reason: format!("{what}: {e}"),
        };
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map(|_| c)
        };
        let mut clock = self.fd.get_clock().map_err(|e| err("clock", e))?;
        // Only the value travels; flags describe the source host's clock.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER).map_err(|e| err("PIC master", e))?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE).map_err(|e| err("PIC slave", e))?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(|e| err("IOAPIC", e))?,
            pit: self.fd.get_pit2().map_err(|e| err("PIT", e))?,
            clock,
        })
    }

    fn restore(&mut self, s: VmState) -> Result<(), MigrationError> {
        let err = |what: &str, e: kvm_ioctls::Error| MigrationError::Restore {
            id: "vm".into(),
            reason: format!("{what}: {e}"),
        };
        self.fd.set_pit2(&s.pit).map_err(|e| err("PIT", e))?;
        self.fd.set_clock(&s.clock).map_err(|e| err("clock", e))?;
        for (what, c) in [
            ("PIC master", &s.pic_master),
            ("PIC slave", &s.pic_slave),
            ("IOAPIC", &s.ioapic),
        ] {
            self.fd.set_irqchip(c).map_err(|e| err(what, e))?;
        }
        Ok(())
    }
}

/// KVM has no VM-wide pause: the in-kernel PIC, IOAPIC and PIT only act through the vCPUs, which
/// the vCPU set stops first; the clock is read when the state is saved.
impl Pausable for Vm {
    fn pause(&self) -> Result<(), MigrationError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), MigrationError> {
        Ok(())
    }
}

/// The VM-wide state KVM keeps: interrupt controllers, PIT, kvmclock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl State for VmState {
    const NAME: &'static str = "vm";
    const VERSION: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::regs::EntryMode;
    use crate::boot::BootEntry;
    use crate::vcpu::Vcpu;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

    /// Needs /dev/kvm: VM and vCPU state saved from one VM restore into a fresh one.
    #[test]
    fn vm_and_vcpu_state_round_trip_through_kvm() {
        let kvm = open_kvm().unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let boot = BootEntry {
            entry: 0x10_0000,
            boot_info: 0x6000,
            mode: EntryMode::Pvh,
        };
        let a = Vm::new(kvm, crate::memory::Layout::fixed(16 << 20)).unwrap();
        let va = Vcpu::new(&a.fd, &cpuid, 0, 1, Some(&boot)).unwrap();
        let vm_state = a.snapshot().unwrap();
        let vcpu_state = va.snapshot().unwrap();

        let mut b = Vm::new(open_kvm().unwrap(), crate::memory::Layout::fixed(16 << 20)).unwrap();
        let other = BootEntry {
            entry: 0x20_0000,
            ..boot
        };
        let mut vb = Vcpu::new(&b.fd, &cpuid, 0, 1, Some(&other)).unwrap();
        b.restore_snapshot(vm_state).unwrap();
        vb.restore_snapshot(vcpu_state).unwrap();
        assert_eq!(vb.fd.get_regs().unwrap().rip, 0x10_0000);
        assert_eq!(vb.fd.get_regs().unwrap().rbx, 0x6000);
        let (sa, sb) = (va.fd.get_sregs().unwrap(), vb.fd.get_sregs().unwrap());
        assert_eq!((sa.cs.selector, sa.cr0), (sb.cs.selector, sb.cr0));
    }
}
