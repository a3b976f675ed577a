//! A minimal KVM virtual machine monitor: one process per VM.
//!
//! The modules follow the parts of a machine:
//! - [`config`]: what the user asked for, validated;
//! - [`memory`]: guest RAM and the guest physical address map;
//! - [`arch`]: x86_64 specifics — CPUID, MSRs, registers, page tables;
//! - [`boot`]: loading a kernel (ELF/PVH or bzImage), initrd and command line;
//! - [`acpi`]: the ACPI tables that describe CPUs and devices to the guest;
//! - [`devices`]: the emulated devices and the buses that route guest I/O to them;
//! - [`vm`] and [`vcpu`]: the KVM VM and its vCPU threads;
//! - [`migration`]: the pause/snapshot traits every component implements;
//! - [`api`]: the control socket and its client;
//! - [`builder`]: builds a machine, booted or from a snapshot's state;
//! - [`persist`]: the machine's components as one tree (pause, save, restore), and snapshots;
//! - [`migrate`]: live migration through a directory on shared storage;
//! - [`checkpoint`]: replicated checkpoints a VM resumes from on another host;
//! - [`standby`]: a VMM holding a VM's memory from its checkpoints, promoted when its host fails;
//! - [`vmm`]: the control loop that runs the machine to its end;
//! - [`seccomp`]: the system calls each kind of thread may make;
//! - [`state_roots`]: the directories API requests may name.

pub mod acpi;
pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod checkpoint;
pub mod config;
pub mod devices;
pub mod lease;
pub mod memory;
pub mod migrate;
pub mod migration;
pub mod persist;
pub mod seccomp;
pub mod snapshot;
pub mod standby;
pub mod state_roots;
pub mod vcpu;
pub mod vm;
pub mod vmm;
