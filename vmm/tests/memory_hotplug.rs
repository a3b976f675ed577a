//! Memory hotplug on this machine's KVM (fast lane): `vmm ctl resize --memory-mib` sets the
//! virtio-mem device's requested size; the test guest's driver plugs blocks (and writes every page
//! of them) or unplugs them, and the host gets unplugged memory back. Bad requests change nothing;
//! a guest that will not give memory up gets a bounded answer; a resized VM keeps its size through
//! a snapshot and a live migration.

mod common;
use common::*;

use std::path::Path;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn memory_mib(api: &Path) -> u64 {
    let (ok, out, err) = ctl_at(api, &["info"]);
    assert!(ok, "{err}");
    json(&out)["memory_mib"].as_u64().unwrap()
}

/// The VMM process's resident memory in MiB (guest RAM is a shared memfd: RssShmem; a restored
/// VM's private copies: RssAnon).
fn rss_mib(vmm: &RunningVmm) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", vmm.child.id())).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    kib >> 10
}

/// A test guest with 64 MiB at boot, growing to `max` MiB, and a blank 2 MiB disk the guest
/// reads into each block it plugs (so the host backs every page of it).
struct Guest {
    vmm: RunningVmm,
    _disk: tempfile::TempDir,
}

impl std::ops::Deref for Guest {
    type Target = RunningVmm;
    fn deref(&self) -> &RunningVmm {
        &self.vmm
    }
}

fn start(max: u64, cmdline: &str) -> Guest {
    let disk = tempfile::tempdir().unwrap();
    let path = disk.path().join("fill.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let max = max.to_string();
    let vmm = RunningVmm::start(&[
        "--memory-mib",
        "64",
        "--max-memory-mib",
        &max,
        "--disk",
        path.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ]);
    Guest { vmm, _disk: disk }
}

fn resize(api: &Path, mib: u64) -> serde_json::Value {
    let (ok, out, err) = ctl_at(api, &["resize", "--memory-mib", &mib.to_string()]);
    assert!(ok, "resize to {mib} MiB: {err}");
    json(&out)
}

fn wait_for_file_line(console: &Path, needle: &str) {
    wait_for_line(console, needle, TIMEOUT);
}

#[test]
fn memory_is_plugged_and_unplugged_and_the_host_gets_it_back() {
    let vmm = start(192, "tg.mode=hold tg.hb_ms=50");
    vmm.wait_for_console("tg: hb n=1 ", TIMEOUT);
    // The device's region starts at 4 GiB and is whole 128 MiB memory blocks.
    vmm.wait_for_console("tg: mem region=0x1000M size_mib=128 fill=disk", TIMEOUT);
    assert_eq!(memory_mib(&vmm.api), 64);
    let before = rss_mib(&vmm);

    let r = resize(&vmm.api, 192);
    assert_eq!(
        (
            r["old"]["memory_mib"].as_u64(),
            r["new"]["memory_mib"].as_u64()
        ),
        (Some(64), Some(192)),
        "{r}"
    );
    // The guest plugged all 64 blocks and wrote every page of them.
    vmm.wait_for_console("tg: mem plugged_mib=128", TIMEOUT);
    assert_eq!(memory_mib(&vmm.api), 192);
    let grown = rss_mib(&vmm);
    assert!(grown >= before + 120, "RSS {before} -> {grown} MiB");

    // Half of it back: the top 32 blocks are unplugged and their pages leave the host.
    let r = resize(&vmm.api, 128);
    assert_eq!(r["new"]["memory_mib"], 128, "{r}");
    vmm.wait_for_console("tg: mem plugged_mib=64", TIMEOUT);
    let half = rss_mib(&vmm);
    assert!(
        half + 56 <= grown && half >= before + 56,
        "RSS {grown} -> {half} MiB"
    );
    let r = resize(&vmm.api, 64);
    assert_eq!(r["new"]["memory_mib"], 64, "{r}");
    let after = rss_mib(&vmm);
    eprintln!("VMM RSS: {before} MiB at 64, {grown} at 192, {half} at 128, {after} at 64 again");
    assert!(
        after <= before + 8,
        "RSS {before} -> {grown} -> {after} MiB"
    );

    // The guest ran throughout.
    let hb = last_heartbeat(&vmm.console_text());
    vmm.wait_for_console(&format!("tg: hb n={} ", hb + 2), TIMEOUT);
}

#[test]
fn bad_memory_resizes_are_refused_and_change_nothing() {
    let fixed = RunningVmm::start(&["--memory-mib", "64", "--cmdline", "tg.mode=hold"]);
    let (ok, _, err) = fixed.ctl(&["resize", "--memory-mib", "128"]);
    assert!(
        !ok && err.contains("started without --max-memory-mib"),
        "{err}"
    );

    let vmm = start(192, "tg.mode=hold tg.hb_ms=50");
    vmm.wait_for_console("tg: hb n=1 ", TIMEOUT);
    for (mib, why) in [
        ("32", "less than the 64 MiB the VM booted with"),
        ("256", "more than the VM's maximum, 192 MiB"),
        ("65", "whole number of 2 MiB blocks"),
        ("x", "invalid value 'x'"),
    ] {
        let (ok, _, err) = vmm.ctl(&["resize", "--memory-mib", mib]);
        assert!(!ok && err.contains(why), "{mib}: {err}");
        assert_eq!(memory_mib(&vmm.api), 64);
    }
    let (ok, _, err) = vmm.ctl(&["pause"]);
    assert!(ok, "{err}");
    let (ok, _, err) = vmm.ctl(&["resize", "--memory-mib", "128"]);
    assert!(!ok && err.contains("paused"), "{err}");
    let (ok, _, err) = vmm.ctl(&["resume"]);
    assert!(ok, "{err}");
    assert_eq!(memory_mib(&vmm.api), 64);
    assert!(!vmm.console_text().contains("tg: mem plugged"));

    // `run` refuses a maximum below the boot size or off the block grid.
    for (max, why) in [("32", "less than --memory-mib"), ("65", "2 MiB blocks")] {
        let (status, _, err) = run_vmm(&[
            "run",
            "--kernel",
            test_guest().to_str().unwrap(),
            "--memory-mib",
            "64",
            "--max-memory-mib",
            max,
        ]);
        assert!(!status.success() && err.contains(why), "{max}: {err}");
    }
}

#[test]
fn a_guest_that_keeps_its_memory_gets_a_bounded_answer() {
    // The guest gives back nothing below 96 MiB (32 MiB plugged): memory "in use".
    let vmm = start(192, "tg.mode=hold tg.hb_ms=50 tg.mem_keep_mib=32");
    vmm.wait_for_console("tg: hb n=1 ", TIMEOUT);
    resize(&vmm.api, 128);
    vmm.wait_for_console("tg: mem plugged_mib=64", TIMEOUT);
    let (ok, _, err) = vmm.ctl(&["resize", "--memory-mib", "64", "--timeout-ms", "1000"]);
    assert!(
        !ok && err.contains("unplugged 32 of 64 MiB") && err.contains("the VM has 96 MiB"),
        "{err}"
    );
    assert_eq!(memory_mib(&vmm.api), 96);
    // Not stuck: the request was withdrawn, the next one is answered and the guest still runs.
    let r = resize(&vmm.api, 160);
    assert_eq!(r["new"]["memory_mib"], 160, "{r}");
    let hb = last_heartbeat(&vmm.console_text());
    vmm.wait_for_console(&format!("tg: hb n={} ", hb + 2), TIMEOUT);
}

#[test]
fn resized_memory_survives_a_snapshot_and_a_live_migration() {
    let first = start(192, "tg.mode=hold tg.hb_ms=50");
    first.wait_for_console("tg: hb n=1 ", TIMEOUT);
    resize(&first.api, 128);
    first.wait_for_console("tg: mem plugged_mib=64", TIMEOUT);
    let snap = tempfile::tempdir().unwrap();
    let last = take_snapshot(&first, snap.path());
    drop(first.vmm);

    let r = restore(snap.path(), &[]);
    r.vmm
        .wait_for_console(&format!("tg: hb n={} ", last + 1), TIMEOUT);
    assert_eq!(memory_mib(&r.vmm.api), 128);

    // Live migration of the restored VM: the target has the same size and shrinks like the
    // source would.
    let shared = tempfile::tempdir().unwrap();
    let tdir = tempfile::tempdir().unwrap();
    let (tconsole, tapi) = (
        tdir.path().join("console.log"),
        tdir.path().join("api.sock"),
    );
    let _target = incoming_vmm(shared.path(), &tconsole, &tapi);
    let mut source = r.vmm;
    let (ok, out, err) = source.ctl(&["migrate", "--dir", shared.path().to_str().unwrap()]);
    assert!(ok && out.contains("completed"), "{out}{err}");
    assert!(source.wait(TIMEOUT).success());
    wait_for_file_line(&tconsole, "tg: hb n=");
    assert_eq!(memory_mib(&tapi), 128);
    let r = resize(&tapi, 64);
    assert_eq!(
        (
            r["old"]["memory_mib"].as_u64(),
            r["new"]["memory_mib"].as_u64()
        ),
        (Some(128), Some(64))
    );
    wait_for_file_line(&tconsole, "tg: mem plugged_mib=0");
    let r = resize(&tapi, 192);
    assert_eq!(r["new"]["memory_mib"], 192, "{r}");
    wait_for_file_line(&tconsole, "tg: mem plugged_mib=128");
}

#[test]
fn a_restored_vm_snapshots_its_hotplug_region_without_reading_the_holes() {
    use std::os::unix::fs::MetadataExt;
    // 64 MiB boot and room for 4 GiB more, 64 MiB of it plugged and filled.
    let first = start(4160, "tg.mode=hold tg.hb_ms=50");
    first.wait_for_console("tg: hb n=1 ", TIMEOUT);
    resize(&first.api, 128);
    first.wait_for_console("tg: mem plugged_mib=64", TIMEOUT);
    let snap = tempfile::tempdir().unwrap();
    take_snapshot(&first, snap.path());
    drop(first.vmm);

    // The restored VM maps that snapshot privately; its own snapshot copies what is there and
    // skips the rest, without faulting 4 GiB of holes in (which would fill memory with zeros).
    let r = restore(snap.path(), &[]);
    r.vmm.wait_for_console("tg: hb n=", TIMEOUT);
    let again = tempfile::tempdir().unwrap();
    take_snapshot(&r.vmm, again.path());
    let file = again.path().join("memory.bin");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), (64 + 4096) << 20);
    let allocated_kib = (meta.blocks() * 512) >> 10;
    let rss = rss_mib(&r.vmm);
    eprintln!("second snapshot: {allocated_kib} KiB allocated; restored VMM RSS {rss} MiB");
    // The guest's own pages are there (the plugged blocks were filled with zeros: skipped).
    assert!(
        allocated_kib > 0 && allocated_kib < 200 << 10,
        "{allocated_kib} KiB allocated"
    );
    assert!(rss < 300, "RSS {rss} MiB");
    // And it restores: the guest goes on with its plugged memory.
    drop(r);
    let r2 = restore(again.path(), &[]);
    r2.vmm.wait_for_console("tg: hb n=", TIMEOUT);
    assert_eq!(memory_mib(&r2.vmm.api), 128);
}
