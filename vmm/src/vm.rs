//! The KVM VM: the /dev/kvm handle, the VM file descriptor, guest memory registered as memory slots,
//! and the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.

use std::fs::File;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_START;
use crate::memory::{create_guest_memory, GuestMemory, MemoryError};

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
    pub memory: GuestMemory,
    /// The file behind guest memory, kept for snapshot and migration.
    pub memory_file: File,
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
    pub fn new(kvm: Kvm, mem_size: u64) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let (memory, memory_file) = create_guest_memory(mem_size)?;
        for (slot, region) in memory.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which the Vm keeps for as long
            // as the VM fd exists.
            unsafe { fd.set_user_memory_region(r) }.map_err(VmError::MemorySlot)?;
        }
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
            memory,
            memory_file,
        })
    }
}
