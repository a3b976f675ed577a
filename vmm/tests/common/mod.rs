//! Helpers for tests that run the `vmm` binary with the test guest on this machine's KVM.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The vmm under test: this build's, or the one `VMM_TEST_BIN` names (`scripts/test.sh` runs
/// some tests again with the static vmm the package ships).
pub fn vmm_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("VMM_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vmm").to_string())
    })
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The test guest, built once per test binary from images/testguest.
pub fn test_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("testguest-{}", std::process::id()));
        let status = Command::new(repo_root().join("images/testguest/build.sh"))
            .arg(&out)
            .status()
            .expect("cannot run images/testguest/build.sh");
        assert!(status.success(), "building the test guest failed");
        out.join("testguest.elf")
    })
}

/// Runs `vmm` with `args` to completion (bounded by `TIMEOUT`); returns status, stdout, stderr.
pub fn run_vmm(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let status = wait_bounded(&mut child, TIMEOUT);
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}

/// Waits for `child` at most `timeout`; kills it and panics if it is still running.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vmm (pid {}) did not exit within {timeout:?}; killed",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (and reaped) when dropped, so a failing test leaves no VMM behind.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vmm run --incoming DIR`, the target of a live migration through `dir`, with its console in
/// `console` and its API at `api`; killed on drop.
pub fn incoming_vmm(
    dir: &std::path::Path,
    console: &std::path::Path,
    api: &std::path::Path,
) -> KillOnDrop {
    let child = std::process::Command::new(vmm_bin())
        .args(["run", "--incoming", dir.to_str().unwrap(), "--serial"])
        .arg(format!("file:{}", console.display()))
        .arg("--api-socket")
        .arg(api)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// A VMM running in the background with its console in a file and an API socket; killed on drop.
pub struct RunningVmm {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub console: PathBuf,
    pub api: PathBuf,
}

impl RunningVmm {
    pub fn start(extra: &[&str]) -> RunningVmm {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let api = dir.path().join("api.sock");
        let serial = format!("file:{}", console.display());
        let mut args = vec![
            "run",
            "--kernel",
            test_guest().to_str().unwrap(),
            "--serial",
            &serial,
            "--api-socket",
            api.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let child = Command::new(vmm_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let vmm = RunningVmm {
            child,
            dir,
            console,
            api,
        };
        vmm.wait_for_console("tg: ready", TIMEOUT);
        vmm
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console has a line containing `needle`; returns that line.
    pub fn wait_for_console(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.console_text().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no console line with {needle:?} within {timeout:?}:\n{}",
                self.console_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `vmm ctl` with `args`; returns (success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        ctl_at(&self.api, args)
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        wait_bounded(&mut self.child, timeout)
    }
}

impl Drop for RunningVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vmm ctl` against the VMM at `api`; returns (success, stdout, stderr).
pub fn ctl_at(api: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(vmm_bin())
        .args(["ctl", "--api-socket", api.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until the file has a line containing `needle`.
pub fn wait_for_line(path: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(needle))
    {
        assert!(
            Instant::now() < deadline,
            "no line with {needle:?} in {} within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number after `key=` in `line`.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// The highest heartbeat counter the test guest printed.
pub fn last_heartbeat(console: &str) -> u64 {
    console
        .lines()
        .filter(|l| l.starts_with("tg: hb "))
        .filter_map(|l| field(l, "n"))
        .max()
        .unwrap_or(0)
}

/// A 1 MiB raw disk image at `path`, zero-filled (sparse).
pub fn blank_disk(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
}

/// A paused VM's snapshot in `dir`; returns the last heartbeat printed before the pause.
pub fn take_snapshot(vmm: &RunningVmm, dir: &Path) -> u64 {
    let (ok, _, err) = vmm.ctl(&["pause"]);
    assert!(ok, "{err}");
    let last = last_heartbeat(&vmm.console_text());
    let (ok, out, err) = vmm.ctl(&["snapshot", "--dir", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("memory_bytes"), "{out}");
    last
}

pub struct Restored {
    pub vmm: RunningVmm,
}

pub fn restore(snap: &Path, extra: &[&str]) -> Restored {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let api = dir.path().join("api.sock");
    let serial = format!("file:{}", console.display());
    let child = Command::new(vmm_bin())
        .args([
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--serial",
            &serial,
            "--api-socket",
        ])
        .arg(&api)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let vmm = RunningVmm {
        child,
        dir,
        console,
        api,
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !vmm.api.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "restored VMM never opened its API socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Restored { vmm }
}
