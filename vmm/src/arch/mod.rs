//! x86_64 specifics: the guest physical address map, CPUID, MSRs and the boot-time register state.

pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod regs;
