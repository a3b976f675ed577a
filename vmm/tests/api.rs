//! The control API over a Unix socket: info, pause, resume, shutdown, and bad requests.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[test]
fn info_pause_resume_and_graceful_shutdown() {
    let mut vmm = RunningVmm::start(&[
        "--vcpus",
        "2",
        "--memory-mib",
        "64",
        "--cmdline",
        "tg.mode=hold tg.hb_ms=50",
    ]);
    let (ok, out, err) = vmm.ctl(&["info"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 64);
    assert_eq!(info["boot_protocol"], "pvh");
    assert_eq!(info["config"]["cmdline"], "tg.mode=hold tg.hb_ms=50");

    vmm.wait_for_console("tg: hb n=2 ", TIMEOUT);
    let (ok, _, err) = vmm.ctl(&["pause"]);
    assert!(ok, "{err}");
    let (_, out, _) = vmm.ctl(&["info"]);
    assert!(out.contains("\"paused\""), "{out}");
    let frozen = last_heartbeat(&vmm.console_text());
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        last_heartbeat(&vmm.console_text()),
        frozen,
        "the guest ran while paused"
    );
    let (ok, _, err) = vmm.ctl(&["pause"]);
    assert!(!ok && err.contains("already paused"), "{err}");

    let (ok, _, err) = vmm.ctl(&["resume"]);
    assert!(ok, "{err}");
    vmm.wait_for_console(&format!("tg: hb n={} ", frozen + 2), TIMEOUT);
    let (ok, _, err) = vmm.ctl(&["resume"]);
    assert!(!ok && err.contains("not paused"), "{err}");

    // The test guest answers the ACPI power button (via the GED) by powering off.
    let (ok, out, err) = vmm.ctl(&["shutdown", "--timeout-ms", "10000"]);
    assert!(ok, "{err}");
    assert!(out.contains("graceful"), "{out}");
    assert!(vmm.wait(TIMEOUT).success());
    assert!(vmm.console_text().contains("tg: power-button"));
    assert!(!vmm.api.exists(), "API socket left behind");
}

#[test]
fn shutdown_forces_a_guest_that_ignores_the_button() {
    let mut vmm = RunningVmm::start(&["--cmdline", "tg.mode=hold tg.ignore_button=1"]);
    let (ok, out, err) = vmm.ctl(&["shutdown", "--timeout-ms", "300"]);
    assert!(ok, "{err}");
    assert!(out.contains("forced"), "{out}");
    assert!(vmm.wait(TIMEOUT).success());
    assert!(!vmm.console_text().contains("tg: poweroff"));
}

fn raw(vmm: &RunningVmm, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(&vmm.api).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn bad_requests_get_errors_and_change_nothing() {
    let vmm = RunningVmm::start(&["--cmdline", "tg.mode=hold"]);
    for (req, expect) in [
        (r#"{"command":"fly"}"#, "unknown variant `fly`"),
        ("not json", "invalid JSON"),
        (r#"{"command":"pause","extra":1}"#, "unknown field"),
        (
            r#"{"command":"shutdown","timeout_ms":"soon"}"#,
            "timeout_ms",
        ),
        ("[]", "object"),
    ] {
        let r = raw(&vmm, req);
        assert_eq!(r["ok"], false, "{req} -> {r}");
        assert!(
            r["error"].as_str().unwrap().contains(expect),
            "{req} -> {r}"
        );
    }
    let r = raw(&vmm, r#"{"command":"info"}"#);
    assert_eq!(r["ok"], true);
    assert_eq!(r["result"]["state"], "running");
}

#[test]
fn taken_api_socket_is_refused_and_the_first_vmm_keeps_running() {
    let first = RunningVmm::start(&["--cmdline", "tg.mode=hold"]);
    let kernel = test_guest().to_str().unwrap();
    let (status, _, err) = run_vmm(&[
        "run",
        "--kernel",
        kernel,
        "--api-socket",
        first.api.to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(err.contains("in use"), "{err}");
    let (ok, out, _) = first.ctl(&["info"]);
    assert!(ok && out.contains("running"), "{out}");
}
