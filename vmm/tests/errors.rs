//! Bad input gets a clear error and a non-zero exit, never a panic.

mod common;
use common::*;

fn fails_with(args: &[&str], expect: &str) {
    let (status, out, err) = run_vmm(args);
    assert!(!status.success(), "{args:?} succeeded:\n{out}");
    assert_eq!(status.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn missing_kernel() {
    fails_with(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
}

#[test]
fn kernel_in_no_supported_format() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("notakernel");
    std::fs::write(&k, vec![0x5au8; 64 * 1024]).unwrap();
    fails_with(
        &["run", "--kernel", k.to_str().unwrap()],
        "not in a supported format",
    );
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    fails_with(
        &["run", "--kernel", empty.to_str().unwrap()],
        "not in a supported format",
    );
}

#[test]
fn initrd_too_large_for_memory() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("big.cpio");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(64 << 20).unwrap();
    let kernel = test_guest().to_str().unwrap();
    fails_with(
        &[
            "run",
            "--kernel",
            kernel,
            "--memory-mib",
            "32",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        "does not fit",
    );
    fails_with(
        &["run", "--kernel", kernel, "--initrd", "/nonexistent/initrd"],
        "/nonexistent/initrd",
    );
}

#[test]
fn vcpu_counts() {
    let kernel = test_guest().to_str().unwrap();
    fails_with(&["run", "--kernel", kernel, "--vcpus", "0"], "at least 1");
    fails_with(
        &["run", "--kernel", kernel, "--vcpus", "100000"],
        "more than this host allows",
    );
}

#[test]
fn memory_that_cannot_be_had() {
    let kernel = test_guest().to_str().unwrap();
    fails_with(
        &["run", "--kernel", kernel, "--memory-mib", "0"],
        "at least 1",
    );
    fails_with(
        &["run", "--kernel", kernel, "--memory-mib", "900000"],
        "memory",
    );
}

#[test]
fn bad_serial_and_cmdline() {
    let kernel = test_guest().to_str().unwrap();
    fails_with(
        &["run", "--kernel", kernel, "--serial", "tcp:1"],
        "--serial",
    );
    let long = "x".repeat(5000);
    fails_with(
        &["run", "--kernel", kernel, "--cmdline", &long],
        "command line",
    );
}

#[test]
fn ctl_without_a_vmm() {
    let (status, _, err) = {
        let out = std::process::Command::new(vmm_bin())
            .args(["ctl", "--api-socket", "/nonexistent/api.sock", "info"])
            .output()
            .unwrap();
        (
            out.status,
            String::new(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(!status.success());
    assert!(err.contains("/nonexistent/api.sock"), "{err}");
}
