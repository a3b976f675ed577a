//! The nested lane: QEMU (TCG, `-cpu max`) runs a Debian L1 whose kvm_amd gives a real /dev/kvm;
//! inside it our `vmm` boots the unmodified Debian cloud kernel as L2. Each scenario is a shell
//! script under `integration/nested/scenarios/` that prints `RESULT <name> pass|fail <detail>`.
//!
//! Needs qemu-system-x86, busybox-static and the images from images/build.sh (scripts/setup.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() || text.contains("SCENARIO-DONE"),
        "{cmd:?} failed:\n{text}"
    );
    text
}

/// Where the release binaries are built.
fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(repo().join("target"))
        .join("release")
}

/// Builds (once per test binary) the release vmm and fleet, the images and the L1 base image.
fn l1_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let repo = repo();
        run(Command::new(env!("CARGO")).current_dir(&repo).args([
            "build",
            "--release",
            "-p",
            "vim",
            "-p",
            "vim-agent",
            // vimd and vimctl; vim-agent (`--bin` would narrow both packages to one).
            "--bins",
        ]));
        run(&mut Command::new(repo.join("images/build.sh")));
        // The vmm as it ships (static: scripts/build-vmm.sh).
        let out = Command::new(repo.join("scripts/build-vmm.sh"))
            .output()
            .expect("scripts/build-vmm.sh");
        assert!(
            out.status.success(),
            "scripts/build-vmm.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vmm = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nested");
        run(Command::new(repo.join("integration/nested/build-l1.sh"))
            .env("L1_VIM_BINS", release_dir())
            .arg(&vmm)
            .arg(&out));
        out.join("l1-base.cpio")
    })
}

/// Runs a scenario in one L1; returns its console.
fn scenario(name: &str, timeout_s: u32) -> String {
    let script = repo()
        .join("integration/nested/scenarios")
        .join(format!("{name}.sh"));
    let base = l1_base();
    let start = std::time::Instant::now();
    let console = run(Command::new(repo().join("integration/nested/run-l1.sh"))
        .arg(base)
        .arg(&script)
        .arg(timeout_s.to_string()));
    // Where the lane's time goes (seen with --nocapture, and in a failure's output).
    eprintln!("scenario {name}: {} s", start.elapsed().as_secs());
    console
}

/// A console's RESULT lines as (name, passed, detail).
fn results(console: &str) -> Vec<(String, bool, String)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|r| {
            let mut it = r.splitn(3, ' ');
            let n = it.next().unwrap_or("").to_string();
            let ok = it.next() == Some("pass");
            (n, ok, it.next().unwrap_or("").to_string())
        })
        .collect()
}

fn expect_all_pass(name: &str, timeout_s: u32, expected: &[&str]) {
    expect_passed(name, &scenario(name, timeout_s), expected);
}

fn expect_passed(name: &str, console: &str, expected: &[&str]) {
    let results = results(console);
    assert!(
        console.contains("SCENARIO-DONE"),
        "scenario {name} did not finish:\n{console}"
    );
    for want in expected {
        let r = results.iter().find(|r| r.0 == *want);
        match r {
            Some((_, true, detail)) => eprintln!("{want}: pass ({detail})"),
            Some((_, false, detail)) => panic!("{want} failed: {detail}\n{console}"),
            None => panic!("{want} reported no result\n{console}"),
        }
    }
}

#[test]
fn debian_guest_boots_with_one_and_two_vcpus_and_powers_off() {
    expect_all_pass("boot", 400, &["boot-1vcpu", "boot-2vcpu"]);
}

#[test]
fn virtio_devices_work_with_the_real_linux_drivers() {
    expect_all_pass(
        "devices",
        500,
        &[
            "devices-boot",
            "blk-size",
            "blk-readonly",
            "rng",
            "blk-persist",
        ],
    );
}

#[test]
fn virtio_net_reaches_a_tap_both_ways() {
    expect_all_pass(
        "net",
        700,
        &[
            "net-mac",
            "net-ping-guest-to-host",
            "net-ping-host-to-guest",
            "net-transfer-guest-to-host",
            "net-transfer-host-to-guest",
            "net-poweroff",
        ],
    );
}

#[test]
fn virtio_balloon_returns_memory_to_the_host() {
    expect_all_pass(
        "balloon",
        400,
        &[
            "balloon-polled",
            "balloon-guest-avail",
            "balloon-host-rss",
            "balloon-stats",
            "balloon-deflate",
            "balloon-limit",
        ],
    );
}

#[test]
fn virtio_vsock_round_trips_through_the_guest_agent() {
    expect_all_pass(
        "vsock",
        400,
        &[
            "vsock-host-to-guest",
            "vsock-agent-mem",
            "vsock-agent-cpu",
            "vsock-guest-to-host",
            "vsock-agent-cpu-offline",
            "vsock-refused-port",
        ],
    );
}

#[test]
fn debian_guest_survives_snapshot_restore_live_migration_and_a_promoted_standby_resumes_it() {
    let mut names = vec![
        "snapshot-restore-snapshot-equal".to_string(),
        "migrate-dead-target".into(),
        "migrate-devices".into(),
        "migrate-balloon".into(),
        "checkpoint-taken".into(),
        "standby-follows".into(),
        "standby-promoted".into(),
        "checkpoint-resumed".into(),
        "checkpoint-disk-instant".into(),
        "checkpoint-disk-intact".into(),
        "checkpoint-goes-on".into(),
    ];
    for moved in ["restore", "takeback", "migrate"] {
        for check in ["counter", "disk-intact", "disk-writes", "net"] {
            names.push(format!("{moved}-{check}"));
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    expect_all_pass("migrate", 900, &names);
}

/// The VIM moves the Debian guest (disk and NIC) between two hosts' agents with `vimctl vm
/// migrate` while it writes to its disk (issue 12).
#[test]
fn the_vim_migrates_the_debian_guest_between_hosts() {
    expect_all_pass(
        "vim-migrate",
        1200,
        &[
            "vim-migrate",
            "vim-counter",
            "vim-net-h1",
            "vim-net-h2",
            "vim-disk-writes",
            "vim-one-vmm",
            "vim-jail",
            "vim-disk-intact",
        ],
    );
}

/// Issue 13 with real hosts that lose power: two L1s are the hosts (vimd, NATS and an NFS server
/// for the shared storage on this machine). Each joins the fleet as issue 19 has it: the command
/// `vimctl host add --join` printed, run in L1, installs fleet-agent from vimd and writes the
/// host's configuration and credentials; L1 then runs that agent. A Debian guest booted by systemd from
/// its ext4 root disk appends and fsyncs numbered records; its host's QEMU is SIGKILLed. The VM
/// boots on the other host, every record reported synced survived, the records go on, and the
/// filesystem is clean once the VM is stopped.
#[test]
fn a_host_that_loses_power_has_its_debian_vm_boot_on_the_other() {
    // The L1 hosts join with the real fleet-agent package, built from the binaries L1 has.
    l1_base();
    run(&mut Command::new(repo().join("scripts/package.sh")));
    let console = run(
        Command::new(repo().join("integration/nested/power-loss/power-loss.sh"))
            .arg(l1_base())
            .arg(release_dir())
            .arg("1500"),
    );
    expect_passed(
        "power-loss",
        &console,
        &[
            "pl-joined",
            "pl-boot",
            "pl-restarted",
            "pl-synced-kept",
            "pl-writes-go-on",
            "pl-fsck",
            "pl-events",
        ],
    );
}

/// Issue 13: the host's watchdog (softdog in L1). The agent arms it, feeds it while it runs (L1
/// lives through three timeouts), disarms it on a clean exit (two more), and when the agent hangs
/// (SIGSTOP) the watchdog resets L1 — softdog is loaded to panic, so the console names the cause.
#[test]
fn a_host_whose_agent_hangs_is_reset_by_its_watchdog() {
    let console = scenario("watchdog", 400);
    let results = results(&console);
    for want in ["wd-armed", "wd-fed", "wd-disarmed"] {
        match results.iter().find(|r| r.0 == want) {
            Some((_, true, detail)) => eprintln!("{want}: pass ({detail})"),
            Some((_, false, detail)) => panic!("{want} failed: {detail}\n{console}"),
            None => panic!("{want} reported no result\n{console}"),
        }
    }
    let hung = console
        .find("WD-AGENT-HUNG")
        .unwrap_or_else(|| panic!("the agent was never hung\n{console}"));
    let after = &console[hung..];
    assert!(
        after.contains("Software Watchdog Timer expired"),
        "no watchdog reset after the agent hung\n{console}"
    );
    assert!(
        !after.contains("RESULT wd-reset"),
        "L1 outlived the watchdog\n{console}"
    );
    for l in after
        .lines()
        .filter(|l| l.contains("WD-AGENT") || l.contains("Watchdog"))
    {
        eprintln!("{l}");
    }
}

/// Issue 14: vCPU and memory hotplug with the unmodified Debian guest — added vCPUs come online,
/// removed ones are offlined and ejected by the guest; virtio-mem grows MemTotal by 1 GiB and
/// shrinks it back; a snapshot's restore and a live migration keep the new size.
#[test]
fn the_debian_guest_takes_and_gives_back_vcpus_and_memory() {
    expect_all_pass(
        "cpu-hotplug",
        1200,
        &[
            "hp-boot",
            "hp-add",
            "hp-remove",
            "mem-add",
            "mem-remove",
            "mem-add-again",
            "hp-restored-size",
            "hp-restore-add",
            "hp-migrated-size",
            "hp-migrated-remove",
            "mem-migrated-remove",
        ],
    );
}
