//! vCPU hotplug on this machine's KVM (fast lane): `vmm ctl resize --vcpus` adds vCPUs the test
//! guest starts (it walks the hotplug controller on the GED's CPU event, as the DSDT's CSCN does
//! for Linux) and removes the ones it ejects; bad requests change nothing; a resized VM's
//! snapshot restores with its new size.

mod common;
use common::*;

use std::path::Path;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn vcpus(api: &Path) -> u64 {
    let (ok, out, err) = ctl_at(api, &["info"]);
    assert!(ok, "{err}");
    json(&out)["vcpus"].as_u64().unwrap()
}

/// The vCPU threads the VMM process runs, by name.
fn vcpu_threads(vmm: &RunningVmm) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", vmm.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("vcpu"))
        .collect();
    names.sort();
    names
}

fn count(console: &str, needle: &str) -> usize {
    console.lines().filter(|l| l.contains(needle)).count()
}

/// The test guest with `vcpus` of `max` vCPUs, 64 MiB.
fn start(vcpus: u32, max: u32, cmdline: &str) -> RunningVmm {
    let (v, m) = (vcpus.to_string(), max.to_string());
    RunningVmm::start(&[
        "--vcpus",
        &v,
        "--max-vcpus",
        &m,
        "--memory-mib",
        "64",
        "--cmdline",
        cmdline,
    ])
}

fn resize(api: &Path, n: u32) -> serde_json::Value {
    let (ok, out, err) = ctl_at(api, &["resize", "--vcpus", &n.to_string()]);
    assert!(ok, "resize to {n}: {err}");
    json(&out)
}

#[test]
fn vcpus_are_added_and_removed_while_the_guest_runs() {
    let vmm = start(1, 3, "tg.mode=hold tg.hb_ms=50");
    // The guest's interrupt handling is up once it counts (an event before that is raised
    // again by the VMM, a second later).
    vmm.wait_for_console("tg: hb n=1 ", TIMEOUT);
    assert_eq!(vcpu_threads(&vmm), ["vcpu0"]);

    let r = resize(&vmm.api, 3);
    assert_eq!(r["old"]["vcpus"], 1, "{r}");
    assert_eq!(r["new"]["vcpus"], 3, "{r}");
    assert!(r["took_ms"].as_f64().unwrap() >= 0.0, "{r}");
    // The guest took both: each new vCPU ran the guest's AP code.
    vmm.wait_for_console("tg: cpu-up apic=1", TIMEOUT);
    vmm.wait_for_console("tg: cpu-up apic=2", TIMEOUT);
    assert_eq!(vcpus(&vmm.api), 3);
    assert_eq!(vcpu_threads(&vmm), ["vcpu0", "vcpu1", "vcpu2"]);

    // Down to one: the guest ejects the top vCPU, then the next; their threads end.
    let r = resize(&vmm.api, 1);
    assert_eq!(
        (r["old"]["vcpus"].as_u64(), r["new"]["vcpus"].as_u64()),
        (Some(3), Some(1))
    );
    let console = vmm.console_text();
    assert_eq!(count(&console, "tg: cpu-ejected apic=2"), 1, "{console}");
    assert_eq!(count(&console, "tg: cpu-ejected apic=1"), 1, "{console}");
    assert_eq!(vcpus(&vmm.api), 1);
    assert_eq!(vcpu_threads(&vmm), ["vcpu0"]);

    // A removed vCPU comes back (KVM keeps it; its thread runs again).
    resize(&vmm.api, 2);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while count(&vmm.console_text(), "tg: cpu-up apic=1") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            vmm.console_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(vcpu_threads(&vmm), ["vcpu0", "vcpu1"]);

    // The same size again: nothing to do.
    let r = resize(&vmm.api, 2);
    assert_eq!(r["took_ms"], 0.0, "{r}");

    // The guest kept running throughout.
    let hb = last_heartbeat(&vmm.console_text());
    vmm.wait_for_console(&format!("tg: hb n={} ", hb + 2), TIMEOUT);
}

#[test]
fn bad_resizes_are_refused_and_change_nothing() {
    let vmm = start(2, 3, "tg.mode=hold tg.hb_ms=50");
    for (args, why) in [
        (&["resize", "--vcpus", "0"][..], "at least 1 vCPU"),
        (
            &["resize", "--vcpus", "4"][..],
            "more than the VM's maximum, 3",
        ),
        (
            &["resize", "--memory-mib", "128"][..],
            "started without --max-memory-mib",
        ),
    ] {
        let (ok, _, err) = vmm.ctl(args);
        assert!(!ok && err.contains(why), "{args:?}: {err}");
        assert_eq!(vcpus(&vmm.api), 2);
    }
    let (ok, _, err) = vmm.ctl(&["pause"]);
    assert!(ok, "{err}");
    let (ok, _, err) = vmm.ctl(&["resize", "--vcpus", "3"]);
    assert!(!ok && err.contains("paused"), "{err}");
    let (ok, _, err) = vmm.ctl(&["resume"]);
    assert!(ok, "{err}");
    assert_eq!(vcpus(&vmm.api), 2);
    assert_eq!(vcpu_threads(&vmm), ["vcpu0", "vcpu1"]);
    // Malformed on the wire: a type error names the field.
    let (ok, _, err) = vmm.ctl(&["resize", "--vcpus", "x"]);
    assert!(!ok, "{err}");
}

#[test]
fn a_guest_that_never_ejects_gets_a_bounded_answer() {
    // The guest ignores the CPU event: the vCPU asked to go is never ejected.
    let vmm = start(2, 2, "tg.mode=hold tg.hb_ms=50 tg.ignore_cpu_hotplug=1");
    vmm.wait_for_console("tg: hb n=1 ", TIMEOUT);
    let (ok, _, err) = vmm.ctl(&["resize", "--vcpus", "1", "--timeout-ms", "300"]);
    assert!(!ok && err.contains("gave back 0 of 1 vCPUs"), "{err}");
    assert_eq!(vcpus(&vmm.api), 2);
    // Not stuck: the next request is answered, and the guest still runs.
    let hb = last_heartbeat(&vmm.console_text());
    vmm.wait_for_console(&format!("tg: hb n={} ", hb + 2), TIMEOUT);
    let r = resize(&vmm.api, 2);
    assert_eq!(r["new"]["vcpus"], 2, "{r}");
}

#[test]
fn a_resized_vm_restores_with_its_new_size() {
    let first = start(1, 4, "tg.mode=hold tg.hb_ms=50");
    first.wait_for_console("tg: hb n=1 ", TIMEOUT);
    resize(&first.api, 3);
    first.wait_for_console("tg: cpu-up apic=2", TIMEOUT);
    let snap = tempfile::tempdir().unwrap();
    let last = take_snapshot(&first, snap.path());
    drop(first);
    let r = restore(snap.path(), &[]);
    r.vmm
        .wait_for_console(&format!("tg: hb n={} ", last + 1), TIMEOUT);
    assert_eq!(vcpus(&r.vmm.api), 3);
    assert_eq!(vcpu_threads(&r.vmm), ["vcpu0", "vcpu1", "vcpu2"]);
    // The controller came along: the restored VM shrinks and grows like the original.
    let s = resize(&r.vmm.api, 2);
    assert_eq!(
        (s["old"]["vcpus"].as_u64(), s["new"]["vcpus"].as_u64()),
        (Some(3), Some(2))
    );
    resize(&r.vmm.api, 4);
    r.vmm.wait_for_console("tg: cpu-up apic=3", TIMEOUT);
    assert_eq!(vcpus(&r.vmm.api), 4);
}

#[test]
fn a_resized_vm_keeps_its_size_through_live_migration() {
    let shared = tempfile::tempdir().unwrap();
    let tdir = tempfile::tempdir().unwrap();
    let (tconsole, tapi) = (
        tdir.path().join("console.log"),
        tdir.path().join("api.sock"),
    );
    let _target = incoming_vmm(shared.path(), &tconsole, &tapi);
    let mut source = start(1, 3, "tg.mode=hold tg.hb_ms=50");
    source.wait_for_console("tg: hb n=1 ", TIMEOUT);
    resize(&source.api, 3);
    source.wait_for_console("tg: cpu-up apic=2", TIMEOUT);
    resize(&source.api, 2);
    let (ok, out, err) = source.ctl(&["migrate", "--dir", shared.path().to_str().unwrap()]);
    assert!(ok && out.contains("completed"), "{out}{err}");
    assert!(source.wait(TIMEOUT).success());
    // The target runs the guest with two vCPUs, and shrinks and grows it like the source did.
    wait_for_line(&tconsole, "tg: hb n=", TIMEOUT);
    assert_eq!(vcpus(&tapi), 2);
    let r = resize(&tapi, 3);
    assert_eq!(
        (r["old"]["vcpus"].as_u64(), r["new"]["vcpus"].as_u64()),
        (Some(2), Some(3))
    );
    wait_for_line(&tconsole, "tg: cpu-added apic=2", TIMEOUT);
    let r = resize(&tapi, 1);
    assert_eq!(r["new"]["vcpus"], 1, "{r}");
}
