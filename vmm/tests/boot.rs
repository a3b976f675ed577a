//! Fast lane: the test guest boots on this machine's KVM and reports what the VMM gave it.

mod common;
use common::*;

fn boot(vcpus: &str, mem: &str, cmdline: &str) -> (i32, String) {
    boot_with(&["--vcpus", vcpus, "--memory-mib", mem, "--cmdline", cmdline])
}

fn boot_with(args: &[&str]) -> (i32, String) {
    let kernel = test_guest().to_str().unwrap();
    let mut all = vec!["run", "--kernel", kernel];
    all.extend_from_slice(args);
    let (status, out, err) = run_vmm(&all);
    assert!(err.is_empty() || !err.contains("panicked"), "{err}");
    (
        status.code().unwrap_or(-1),
        format!("{out}\n--- stderr ---\n{err}"),
    )
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{out}"))
}

#[test]
fn one_vcpu_boots_reports_and_powers_off() {
    let (code, out) = boot("1", "128", "tg.mode=poweroff");
    assert_eq!(code, 0, "{out}");
    let ready = line(&out, "tg: ready");
    assert_eq!(field(ready, "cpus"), Some(1), "{ready}");
    assert_eq!(field(ready, "mem_mib"), Some(128), "{ready}");
    assert!(
        out.contains("tg: boot cmdline=\"tg.mode=poweroff\""),
        "{out}"
    );
    assert!(out.contains("tg: poweroff"), "{out}");
}

#[test]
fn two_vcpus_all_run() {
    let (code, out) = boot("2", "256", "tg.mode=smp");
    assert_eq!(code, 0, "{out}");
    let ready = line(&out, "tg: ready");
    assert_eq!(field(ready, "cpus"), Some(2), "{ready}");
    assert_eq!(field(ready, "mem_mib"), Some(256), "{ready}");
    assert!(out.contains("tg: cpu-up apic=1"), "{out}");
    assert!(out.contains("tg: smp cpus=2 ok"), "{out}");
}

#[test]
fn four_vcpus_all_run() {
    let (code, out) = boot("4", "64", "tg.mode=smp");
    assert_eq!(code, 0, "{out}");
    for apic in 1..4 {
        assert!(out.contains(&format!("tg: cpu-up apic={apic}")), "{out}");
    }
    assert!(out.contains("tg: smp cpus=4 ok"), "{out}");
}

#[test]
fn acpi_walk_finds_exactly_the_configured_devices() {
    let (code, out) = boot("3", "128", "tg.mode=poweroff");
    assert_eq!(code, 0, "{out}");
    let devices: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("tg: device "))
        .collect();
    // COM1, power button, GED, the CPU hotplug controller, the processor container and one
    // processor device per vCPU slot (here as many as vCPUs).
    assert_eq!(devices.len(), 5 + 3, "{out}");
    assert!(
        devices.contains(&"tg: device hid=PNP0A06 mmio=0xfeb01000+0x8 irq=0"),
        "{out}"
    );
    assert!(
        devices.contains(&"tg: device hid=PNP0501 io=0x3f8 irq=4"),
        "{out}"
    );
    assert!(devices.contains(&"tg: device hid=ACPI0013 irq=5"), "{out}");
    assert!(devices.contains(&"tg: device hid=PNP0C0C irq=0"), "{out}");
    assert_eq!(
        devices
            .iter()
            .filter(|d| d.contains("hid=ACPI0007"))
            .count(),
        3,
        "{out}"
    );
    let acpi = line(&out, "tg: acpi");
    assert_eq!(field(acpi, "cpus"), Some(3));
    assert_eq!(field(acpi, "virtio"), Some(0));
    assert_eq!(field(acpi, "s5"), Some(5));
    assert_eq!(field(acpi, "hw_reduced"), Some(1));
    let apics: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("tg: cpu apic="))
        .collect();
    assert_eq!(
        apics,
        ["tg: cpu apic=0", "tg: cpu apic=1", "tg: cpu apic=2"]
    );
}

/// `--max-vcpus` above `--vcpus`: the guest finds the present vCPUs running and further slots in
/// the MADT (online-capable) and in the CPUID topology, ready for CPUs added later.
#[test]
fn spare_vcpu_slots_are_described_but_not_started() {
    let (code, out) = boot_with(&[
        "--vcpus",
        "2",
        "--max-vcpus",
        "4",
        "--memory-mib",
        "64",
        "--cmdline",
        "tg.mode=smp",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tg: smp cpus=2 ok"), "{out}");
    assert!(!out.contains("tg: cpu-up apic=2"), "{out}");
    let acpi = line(&out, "tg: acpi");
    assert_eq!(field(acpi, "cpus"), Some(2), "{acpi}");
    assert_eq!(field(acpi, "slots"), Some(4), "{acpi}");
    assert_eq!(field(line(&out, "tg: cpuid"), "logical"), Some(4), "{out}");
    let (code, out) = boot_with(&["--vcpus", "3", "--max-vcpus", "2"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("--max-vcpus 2 is fewer than --vcpus 3"),
        "{out}"
    );
}

#[test]
fn large_memory_spans_the_mmio_hole() {
    // 4 GiB: RAM continues above 4 GiB; the guest counts both blocks.
    let (code, out) = boot("1", "4096", "tg.mode=poweroff");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        field(line(&out, "tg: ready"), "mem_mib"),
        Some(4096),
        "{out}"
    );
}

#[test]
fn debug_exit_status_becomes_the_exit_code() {
    let (code, out) = boot("1", "32", "tg.mode=exit tg.code=7");
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("tg: debug-exit"), "{out}");
}

#[test]
fn heartbeats_and_dirtying_run() {
    let vmm = RunningVmm::start(&[
        "--memory-mib",
        "96",
        "--cmdline",
        "tg.mode=dirty tg.dirty_mib=32 tg.rate_mib=64 tg.hb_ms=100",
    ]);
    let hb = vmm.wait_for_console("tg: hb n=3 ", TIMEOUT);
    assert!(field(&hb, "dirtied_mib").unwrap() >= 12, "{hb}");
}

#[test]
fn guest_misbehaviour_is_ignored() {
    let (code, out) = boot("1", "64", "tg.mode=probe");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tg: probe done"), "{out}");
    assert!(out.contains("tg: poweroff"), "{out}");
}

#[test]
fn a_crashing_guest_ends_the_vmm_with_its_registers() {
    let (code, out) = boot("1", "64", "tg.mode=crash");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tg: crash"), "{out}");
    let err = out.split("--- stderr ---").nth(1).unwrap();
    assert!(err.contains("vCPU 0:") && err.contains("rip=0x"), "{err}");
    assert!(
        err.contains("triple fault") || err.contains("internal error"),
        "{err}"
    );
}
