//! Snapshot and restore of the test guest on this machine's KVM (fast lane).

mod common;
use common::*;

use std::path::{Path, PathBuf};

#[test]
fn restored_guest_continues_counting_and_shuts_down_cleanly() {
    let snap = tempfile::tempdir().unwrap();
    let mut first = RunningVmm::start(&[
        "--vcpus",
        "2",
        "--memory-mib",
        "128",
        "--cmdline",
        "tg.mode=dirty tg.dirty_mib=32 tg.rate_mib=32 tg.hb_ms=50",
    ]);
    first.wait_for_console("tg: hb n=4 ", TIMEOUT);
    let last = take_snapshot(&first, snap.path());
    let (ok, _, _) = first.ctl(&["shutdown", "--timeout-ms", "200"]);
    assert!(ok);
    first.wait(TIMEOUT);

    let mut r = restore(snap.path(), &[]);
    // The counter lives in guest memory: the first heartbeat after restore is the next number.
    let next = r.vmm.wait_for_console("tg: hb ", TIMEOUT);
    assert_eq!(field(&next, "n"), Some(last + 1), "{next}");
    r.vmm
        .wait_for_console(&format!("tg: hb n={} ", last + 3), TIMEOUT);
    let (ok, out, _) = r.vmm.ctl(&["info"]);
    assert!(
        ok && out.contains("\"restored\"") && out.contains("\"running\""),
        "{out}"
    );
    // Interrupt routing was restored too: the power button reaches the guest.
    let (ok, out, err) = r.vmm.ctl(&["shutdown", "--timeout-ms", "10000"]);
    assert!(ok && out.contains("graceful"), "{out}{err}");
    assert!(r.vmm.wait(TIMEOUT).success());
}

#[test]
fn snapshot_needs_a_paused_vm() {
    let vmm = RunningVmm::start(&["--cmdline", "tg.mode=hold"]);
    let snap = tempfile::tempdir().unwrap();
    let (ok, _, err) = vmm.ctl(&["snapshot", "--dir", snap.path().to_str().unwrap()]);
    assert!(!ok && err.contains("pause"), "{err}");
    assert!(!snap.path().join("state.bin").exists());
}

/// Fields that must differ between two snapshots of the same paused guest: the LAPIC timer's
/// current count (TMCCT, offset 0x390) is computed when read, and the TSC keeps counting.
fn normalise_vcpu(v: &mut serde_json::Value) {
    if let Some(msrs) = v.pointer_mut("/state/msrs").and_then(|m| m.as_array_mut()) {
        msrs.retain(|e| e[0] != 0x10);
    }
    if let Some(regs) = v.pointer_mut("/state/lapic").and_then(|l| l.as_array_mut()) {
        for b in regs.iter_mut().skip(0x390).take(4) {
            *b = 0.into();
        }
    }
}

#[test]
fn snapshot_of_a_restored_paused_vm_equals_the_original() {
    let snap1 = tempfile::tempdir().unwrap();
    let snap2 = tempfile::tempdir().unwrap();
    // Devices too (the test guest has no virtio drivers, so they are unconfigured; the Debian
    // guest's live queues are compared in the nested lane).
    let disk = snap1.path().join("disk.img");
    blank_disk(&disk);
    let first = RunningVmm::start(&[
        "--vcpus",
        "2",
        "--memory-mib",
        "64",
        "--disk",
        disk.to_str().unwrap(),
        "--rng",
        "--balloon",
        "--cmdline",
        "tg.mode=hold tg.hb_ms=50",
    ]);
    first.wait_for_console("tg: hb n=2 ", TIMEOUT);
    take_snapshot(&first, snap1.path());
    drop(first);

    let r = restore(snap1.path(), &["--paused"]);
    let (ok, out, _) = r.vmm.ctl(&["info"]);
    assert!(ok && out.contains("\"paused\""), "{out}");
    let (ok, _, err) = r
        .vmm
        .ctl(&["snapshot", "--dir", snap2.path().to_str().unwrap()]);
    assert!(ok, "{err}");

    let a = vmm::snapshot::read_state(snap1.path()).unwrap();
    let b = vmm::snapshot::read_state(snap2.path()).unwrap();
    assert_eq!(a.vcpus.len(), b.vcpus.len());
    for (x, y) in a.vcpus.iter().zip(&b.vcpus) {
        let (mut x, mut y) = (
            serde_json::to_value(x).unwrap(),
            serde_json::to_value(y).unwrap(),
        );
        normalise_vcpu(&mut x);
        normalise_vcpu(&mut y);
        assert!(x == y, "vCPU state changed across restore");
    }
    assert_eq!(json(&a.devices), json(&b.devices));
    assert_eq!(
        a.devices.virtio.len(),
        3,
        "virtio devices missing from the snapshot"
    );
    // Interrupt controllers equal; the PIT and kvmclock are allowed to have moved.
    let (va, vb) = (json(&a.vm), json(&b.vm));
    for chip in ["pic_master", "pic_slave", "ioapic"] {
        assert_eq!(va["state"][chip], vb["state"][chip], "{chip}");
    }
    // Guest memory, byte for byte (holes read as zeros).
    let m1 = std::fs::read(snap1.path().join("memory.bin")).unwrap();
    let m2 = std::fs::read(snap2.path().join("memory.bin")).unwrap();
    assert!(m1 == m2, "guest memory differs");
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["state.bin", "memory.bin"] {
        std::fs::copy(from.join(f), d.path().join(f)).unwrap();
    }
    d
}

fn refused(snap: &Path, expect: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let api: PathBuf = tmp.path().join("api.sock");
    let (status, out, err) = run_vmm(&[
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
        "--serial",
        "file:/dev/null",
    ]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(!api.exists(), "a refused restore must not start anything");
}

#[test]
fn corrupt_snapshots_are_refused() {
    let good = tempfile::tempdir().unwrap();
    let vmm = RunningVmm::start(&["--memory-mib", "32", "--cmdline", "tg.mode=hold"]);
    take_snapshot(&vmm, good.path());
    drop(vmm);
    let state = std::fs::read(good.path().join("state.bin")).unwrap();

    let d = copy_dir(good.path());
    let mut s = state.clone();
    s[0] = b'X';
    std::fs::write(d.path().join("state.bin"), &s).unwrap();
    refused(d.path(), "bad magic");

    let d = copy_dir(good.path());
    let mut s = state.clone();
    s[8] = 3; // major version 3, the rest as written
    std::fs::write(d.path().join("state.bin"), &s).unwrap();
    let minor = vmm::snapshot::VERSION[1];
    refused(
        d.path(),
        &format!("version 3.{minor}.0 is not readable by this build"),
    );

    let d = copy_dir(good.path());
    let mut s = state.clone();
    let last = s.len() - 10;
    s[last] ^= 0x01;
    std::fs::write(d.path().join("state.bin"), &s).unwrap();
    refused(d.path(), "CRC-32");

    let d = copy_dir(good.path());
    std::fs::write(d.path().join("state.bin"), &state[..state.len() / 2]).unwrap();
    refused(d.path(), "truncated");
    std::fs::write(d.path().join("state.bin"), &state[..10]).unwrap();
    refused(d.path(), "truncated");

    let d = copy_dir(good.path());
    let m = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join("memory.bin"))
        .unwrap();
    m.set_len(16 << 20).unwrap();
    refused(d.path(), "memory file");

    let d = copy_dir(good.path());
    std::fs::remove_file(d.path().join("memory.bin")).unwrap();
    refused(d.path(), "memory.bin");

    let d = copy_dir(good.path());
    std::fs::remove_file(d.path().join("state.bin")).unwrap();
    refused(d.path(), "state.bin");

    // A snapshot whose disk (on shared storage, not in the snapshot) has gone.
    let d = copy_dir(good.path());
    let mut st = vmm::snapshot::read_state(d.path()).unwrap();
    st.config
        .devices
        .disks
        .push("/nonexistent/shared/disk.img".parse().unwrap());
    vmm::snapshot::write_state(d.path(), &st).unwrap();
    refused(d.path(), "disk /nonexistent/shared/disk.img is missing");

    // A component saved in a layout this build does not read is named, with both versions.
    let d = copy_dir(good.path());
    let mut st = json(&vmm::snapshot::read_state(d.path()).unwrap());
    st["devices"]["ged"]["version"] = 99.into();
    write_raw_state(d.path(), &serde_json::to_vec(&st).unwrap());
    refused(
        d.path(),
        "ged state version 99 is not readable by this build (reads 2)",
    );
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

/// `state.bin` with `body` as its JSON, under a valid header (magic, version, length, CRC).
fn write_raw_state(dir: &std::path::Path, body: &[u8]) {
    let mut out = vmm::snapshot::MAGIC.to_vec();
    for v in vmm::snapshot::VERSION {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    std::fs::write(dir.join("state.bin"), out).unwrap();
}
