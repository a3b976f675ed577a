//! Boot-time MSR values. A host may refuse some MSRs (nested PVM refuses a few); each refusal is
//! logged and skipped, never fatal, because the guest can run without them.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values a vCPU starts with. The TSC is left alone: KVM keeps the vCPUs' TSCs in step,
/// and per-vCPU writes made at different moments would make the guest call its TSC unstable.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// MSRs a running guest depends on beyond the boot set: saved and restored with the vCPU. The TSC
/// comes before the TSC deadline, which is relative to it.
pub fn state_msr_indices() -> Vec<u32> {
    let mut v: Vec<u32> = boot_msrs().iter().map(|e| e.index).collect();
    v.extend([
        0x10,        // IA32_TSC
        0x6e0,       // IA32_TSC_DEADLINE
        0x277,       // IA32_PAT
        0xc000_0103, // TSC_AUX
        0x4b56_4d00, // kvmclock wall clock
        0x4b56_4d01, // kvmclock system time
        0x4b56_4d02, // async page fault
        0x4b56_4d03, // steal time
        0x4b56_4d04, // PV EOI
        0x4b56_4d05, // poll control
    ]);
    v
}

/// Reads `indices`, skipping any the host refuses.
pub fn get_msrs_tolerant(
    vcpu: &VcpuFd,
    indices: &[u32],
) -> Result<Vec<(u32, u64)>, kvm_ioctls::Error> {
    let mut out = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        let n = vcpu.get_msrs(&mut msrs)?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n >= rest.len() {
            break;
        }
        tracing::debug!(
            msr = format_args!("{:#x}", rest[n]),
            "host refused to read MSR; not saved"
        );
        rest = &rest[n + 1..];
    }
    Ok(out)
}

/// Sets `entries`; if KVM stops early, the refused MSR is logged and the rest are set after it.
/// Returns the indices of refused MSRs.
pub fn set_msrs_tolerant(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Vec<u32> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let set = match Msrs::from_entries(rest) {
            Ok(msrs) => vcpu.set_msrs(&msrs).unwrap_or(0),
            Err(_) => 0,
        };
        if set >= rest.len() {
            break;
        }
        let bad = rest[set].index;
        tracing::debug!(msr = format_args!("{bad:#x}"), "host refused MSR; skipped");
        refused.push(bad);
        rest = &rest[set + 1..];
    }
    refused
}
