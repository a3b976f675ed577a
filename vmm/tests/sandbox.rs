//! The VMM's sandbox: every thread of a running VMM is seccomp-filtered, a forbidden call from
//! any kind of thread stops the VMM with a line that names the thread and the call, and API
//! requests cannot name directories outside the state roots given at start.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;

/// The threads of process `pid`: (name, seccomp mode, no_new_privs).
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(t.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap(),
            field("NoNewPrivs:").parse().unwrap(),
        ));
    }
    out
}

/// A guest with a disk, vsock, rng and a virtio-mem region: a worker thread for each device.
fn guest_with_devices(extra: &[&str]) -> (RunningVmm, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let vsock = format!("cid=3,socket={}", dir.path().join("v.sock").display());
    let mut args = vec![
        "--memory-mib",
        "128",
        "--max-memory-mib",
        "256",
        "--disk",
        disk.to_str().unwrap(),
        "--vsock",
        &vsock,
        "--rng",
        "--cmdline",
        "tg.mode=hold",
    ];
    args.extend_from_slice(extra);
    let vmm = RunningVmm::start(&args);
    vmm.wait_for_console("tg: mem region=", TIMEOUT);
    (vmm, dir)
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    let (vmm, _dir) = guest_with_devices(&["--vcpus", "2"]);
    let (ok, _, err) = vmm.ctl(&["info"]);
    assert!(ok, "{err}");
    let threads = threads(vmm.child.id());
    let names: Vec<&str> = threads.iter().map(|(n, _, _)| n.as_str()).collect();
    for expected in ["vcpu0", "vcpu1", "api", "spawner", "virtio-mem"] {
        assert!(
            names.contains(&expected),
            "no {expected} thread in {names:?}"
        );
    }
    for (name, mode, nnp) in &threads {
        // 2: SECCOMP_MODE_FILTER.
        assert_eq!(*mode, 2, "thread {name} is not filtered: {threads:?}");
        assert_eq!(*nnp, 1, "thread {name} may gain privileges: {threads:?}");
    }
    // Still working under the filters: a snapshot (files) and a resize (a new vCPU thread).
    let (ok, _, err) = vmm.ctl(&["resize", "--vcpus", "1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = vmm.ctl(&["pause"]);
    assert!(ok, "{err}");
    let snap = vmm.dir.path().join("snap");
    let (ok, _, err) = vmm.ctl(&["snapshot", "--dir", snap.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(snap.join("state.bin").exists());
}

#[test]
fn no_seccomp_runs_unfiltered() {
    let vmm = RunningVmm::start(&["--no-seccomp", "--cmdline", "tg.mode=hold"]);
    let threads = threads(vmm.child.id());
    assert!(threads.iter().all(|(_, mode, _)| *mode == 0), "{threads:?}");
}

#[test]
fn a_forbidden_call_from_each_kind_of_thread_stops_the_vmm_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    for (kind, thread) in [
        ("vmm", "main"),
        ("vcpu", "vcpu0"),
        ("device", "virtio-mem"),
        ("api", "api"),
    ] {
        let _ = std::fs::remove_file(&api);
        let (status, _, err) = run_vmm(&[
            "run",
            "--kernel",
            test_guest().to_str().unwrap(),
            "--memory-mib",
            "128",
            "--max-memory-mib",
            "256",
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            "tg.mode=hold",
            "--seccomp-selftest",
            kind,
        ]);
        assert_eq!(
            status.code(),
            Some(128 + libc::SIGSYS),
            "{kind}: {status:?} (signal {:?}); stderr:\n{err}",
            status.signal()
        );
        let line = format!(
            "vmm: seccomp: thread {thread} ({kind} filter) made the forbidden system call \
             execve (59); the VMM stops"
        );
        assert!(err.contains(&line), "{kind}: no {line:?} in:\n{err}");
    }
}

#[test]
fn snapshots_and_migrations_stay_under_the_state_roots() {
    let roots = tempfile::tempdir().unwrap();
    let allowed = roots.path().join("vm");
    let outside = roots.path().join("elsewhere");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
    let vmm = RunningVmm::start(&[
        "--state-root",
        allowed.to_str().unwrap(),
        "--cmdline",
        "tg.mode=hold",
    ]);
    let (ok, _, err) = vmm.ctl(&["pause"]);
    assert!(ok, "{err}");
    for bad in [
        outside.join("snap"),
        allowed.join("../elsewhere/snap"),
        allowed.join("link/snap"),
    ] {
        let (ok, _, err) = vmm.ctl(&["snapshot", "--dir", bad.to_str().unwrap()]);
        assert!(!ok, "snapshot to {} was allowed", bad.display());
        assert!(
            err.contains("outside the directories this VMM may use")
                || err.contains("without '..'"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let good = allowed.join("snaps/1");
    let (ok, _, err) = vmm.ctl(&["snapshot", "--dir", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(good.join("state.bin").exists());
    let (ok, _, err) = vmm.ctl(&["resume"]);
    assert!(ok, "{err}");
    let mig = outside.join("mig");
    let (ok, _, err) = vmm.ctl(&["migrate", "--dir", mig.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("outside the directories"), "{err}");
    assert!(!mig.exists());
    // The guest runs on, unharmed.
    let n = last_heartbeat(&vmm.console_text());
    vmm.wait_for_console(&format!("tg: hb n={} ", n + 2), TIMEOUT);
}

#[test]
fn a_state_root_that_is_not_a_directory_is_refused_at_start() {
    let (status, _, err) = run_vmm(&[
        "run",
        "--kernel",
        test_guest().to_str().unwrap(),
        "--state-root",
        "/nonexistent/state",
    ]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("state root /nonexistent/state"), "{err}");
}

/// Many threads at once (vCPUs, device workers, an API connection each): glibc reads the CPU
/// count from /sys once a thread needs a ninth malloc arena, which a filtered thread may not do;
/// the VMM fixes the arena count before any thread starts.
#[test]
fn many_api_connections_at_once_do_not_trip_the_filters() {
    use std::io::{BufRead, BufReader, Write};
    let (vmm, _dir) = guest_with_devices(&["--vcpus", "4"]);
    // One less than the VMM's limit, so that `ctl` still gets through.
    let conns: Vec<_> = (0..vmm::api::server::MAX_CONNECTIONS - 1)
        .map(|_| {
            let mut s = std::os::unix::net::UnixStream::connect(&vmm.api).unwrap();
            s.write_all(b"{\"command\":\"info\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.contains("\"running\""), "{line}");
            s
        })
        .collect();
    let (ok, _, err) = vmm.ctl(&["pause"]);
    drop(conns);
    assert!(ok, "{err}");
    let threads = threads(vmm.child.id());
    assert!(threads.iter().all(|(_, mode, _)| *mode == 2), "{threads:?}");
}
