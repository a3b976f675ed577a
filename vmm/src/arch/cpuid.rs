//! Per-vCPU CPUID: what KVM supports on this host, with the topology of this VM filled in.
//!
//! The topology is one socket with one core per vCPU and one thread per core; APIC id == vCPU index.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

/// ECX bit 31 of leaf 1: running under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// ECX bit 24 of leaf 1: TSC-deadline timer, which KVM emulates even when the host lacks it.
const TSC_DEADLINE_BIT: u32 = 1 << 24;
/// EDX bit 29 of leaf 7: IA32_ARCH_CAPABILITIES. Some hosts (nested PVM) refuse that MSR, so a
/// guest must not be told to read it.
const ARCH_CAPABILITIES_BIT: u32 = 1 << 29;

/// Bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Fills in the CPUID entries for vCPU `index` of `count`.
pub fn configure(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = u32::from(index);
    let count = u32::from(count);
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        configure_entry(e, apic_id, count, core_bits);
    }
    cpuid
}

fn configure_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_bits: u32) {
    match e.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package, [15:8] CLFLUSH.
            e.ebx = (apic_id << 24) | ((count.min(255)) << 16) | (e.ebx & 0xffff);
            e.ecx |= HYPERVISOR_BIT | TSC_DEADLINE_BIT;
            // EDX bit 28 (HTT): the logical processor count field is valid.
            if count > 1 {
                e.edx |= 1 << 28;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
            let cores = (count - 1).min(63);
            e.eax = (e.eax & 0x3fff) | (cores << 26);
            let shared = if (e.eax >> 5) & 0x7 >= 3 {
                count - 1
            } else {
                0
            };
            e.eax = (e.eax & !(0xfff << 14)) | ((shared & 0xfff) << 14);
        }
        LEAF_EXT_FEATURES if e.index == 0 => {
            e.edx &= !ARCH_CAPABILITIES_BIT;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                1 => {
                    // Core level: `count` cores per package.
                    e.eax = core_bits;
                    e.ebx = count;
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_SIZE => {
            // ECX[15:12] APIC id bits for cores, [7:0] cores - 1.
            e.ecx = (core_bits << 12) | (count - 1).min(255);
        }
        LEAF_AMD_EXT_APIC => {
            e.eax = apic_id;
            // EBX[7:0] core id, [15:8] threads per core - 1.
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_is_per_vcpu() {
        let supported =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(7, 0)]).unwrap();
        let c = configure(&supported, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[2].ebx, 4);
        assert_eq!(s[2].eax, 2);
    }

    #[test]
    fn bit_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
