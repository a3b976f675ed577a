//! Replicated checkpoints (docs/checkpoint.md) of the test guest on this machine's KVM (fast
//! lane): a guest killed with its VMM resumes from its latest complete checkpoint, memory and disk
//! from one instant. The guest checks that itself: with `tg.disk_hb=1` each heartbeat reads back
//! the counter it wrote to its disk at the heartbeat before, and says `disk=ok` only when the
//! disk holds exactly that.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Guest {
    vmm: RunningVmm,
    disk: PathBuf,
    ckpt: PathBuf,
    _shared: tempfile::TempDir,
}

fn guest() -> Guest {
    let shared = tempfile::tempdir().unwrap();
    let disk = shared.path().join("disk.img");
    blank_disk(&disk);
    // Checkpoints may go only under the VM's own directory, as the agent runs it.
    let vmm = RunningVmm::start(&[
        "--memory-mib",
        "128",
        "--disk",
        disk.to_str().unwrap(),
        "--state-root",
        shared.path().to_str().unwrap(),
        "--cmdline",
        "tg.mode=dirty tg.dirty_mib=16 tg.rate_mib=16 tg.hb_ms=100 tg.disk_hb=1",
    ]);
    // Its whole dirty region touched (16 MiB at 16 MiB/s): a whole checkpoint copies all of it.
    vmm.wait_for_console("tg: hb n=12 ", TIMEOUT);
    Guest {
        vmm,
        disk,
        ckpt: shared.path().join("checkpoint"),
        _shared: shared,
    }
}

impl Guest {
    fn checkpoint(&self) -> serde_json::Value {
        let (ok, out, err) = self
            .vmm
            .ctl(&["checkpoint", "--dir", self.ckpt.to_str().unwrap()]);
        assert!(ok, "checkpoint failed: {err}");
        serde_json::from_str(&out).unwrap()
    }

    /// The guest's last heartbeat, then a few more (it ran on after the checkpoint), then the
    /// VMM SIGKILLed: what a host crash leaves.
    fn crash(mut self) -> (PathBuf, PathBuf, tempfile::TempDir) {
        let last = last_heartbeat(&self.vmm.console_text());
        self.vmm
            .wait_for_console(&format!("tg: hb n={} ", last + 3), TIMEOUT);
        self.vmm.child.kill().unwrap();
        self.vmm.child.wait().unwrap();
        (self.ckpt, self.disk, self._shared)
    }
}

fn raw_request(api: &Path, line: &str) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(api).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).unwrap();
    answer
}

fn published(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Waits (bounded) until `name` is all that is left in checkpoint directory `dir`.
fn only_left(dir: &Path, name: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while published(dir) != [name] {
        assert!(
            Instant::now() < deadline,
            "{:?} left in {}",
            published(dir),
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vmm restore --checkpoint DIR`: its console, stderr file and API socket in a new directory.
fn resume(ckpt: &Path) -> (RunningVmm, PathBuf) {
    restore_checkpoint(ckpt, &[])
}

/// `vmm restore --checkpoint DIR` with `extra` arguments.
fn restore_checkpoint(ckpt: &Path, extra: &[&str]) -> (RunningVmm, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let api = dir.path().join("api.sock");
    let stderr = dir.path().join("stderr");
    let child = Command::new(vmm_bin())
        .args([
            "restore",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--serial",
        ])
        .arg(format!("file:{}", console.display()))
        .arg("--api-socket")
        .arg(&api)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let vmm = RunningVmm {
        child,
        dir,
        console,
        api,
    };
    (vmm, stderr)
}

/// What the resumed VMM said it resumed from.
fn resumed_from(stderr: &Path) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(stderr).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find_map(|l| l.strip_prefix(vmm_api::CHECKPOINT_RESUMED_LINE))
        {
            return serde_json::from_str(l).unwrap();
        }
        assert!(Instant::now() < deadline, "no resume line: {text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The heartbeats the resumed guest prints: they go on from the checkpoint's counter, and the
/// disk agrees with memory at each.
fn assert_resumed_consistently(vmm: &RunningVmm, from: u64) {
    let first = vmm.wait_for_console("tg: hb ", TIMEOUT);
    assert_eq!(field(&first, "n"), Some(from + 1), "{first}");
    vmm.wait_for_console(&format!("tg: hb n={} ", from + 4), TIMEOUT);
    // Only the resumed guest's lines, from its first beat on: the killed VMM's last line may be
    // cut short where the SIGKILL struck (its console is the same file).
    let text = vmm.console_text();
    let lines: Vec<&str> = text.lines().collect();
    let start = format!("tg: hb n={} ", from + 1);
    let at = lines.iter().rposition(|l| l.starts_with(&start));
    let resumed: Vec<&str> = lines[at.unwrap_or(lines.len())..]
        .iter()
        .copied()
        .filter(|l| l.starts_with("tg: hb "))
        .collect();
    assert!(
        resumed.len() >= 4,
        "the resumed guest's beats not found: {text}"
    );
    for l in resumed {
        assert!(l.contains(" disk=ok"), "memory and disk disagree: {l}");
    }
}

/// The counter the guest had at a checkpoint's instant: the heartbeat in its memory, read back
/// from the checkpoint's disk copy (the guest writes it there at each heartbeat).
fn counter_on_disk(disk: &Path) -> u64 {
    let b = std::fs::read(disk).unwrap();
    assert_eq!(&b[..4], b"TGHB", "no heartbeat on the disk");
    u64::from(u32::from_le_bytes(b[4..8].try_into().unwrap()))
}

#[test]
fn a_killed_guest_resumes_from_its_latest_checkpoint_memory_and_disk_of_one_instant() {
    let g = guest();
    let first = g.checkpoint();
    assert_eq!(
        (first["seq"].as_u64(), first["full"].as_bool()),
        (Some(1), Some(true)),
        "{first}"
    );
    g.vmm.wait_for_console(
        &format!("tg: hb n={} ", last_heartbeat(&g.vmm.console_text()) + 2),
        TIMEOUT,
    );
    let second = g.checkpoint();
    assert_eq!(second["full"].as_bool(), Some(true), "{second}");
    g.vmm.wait_for_console(
        &format!("tg: hb n={} ", last_heartbeat(&g.vmm.console_text()) + 2),
        TIMEOUT,
    );
    // The third goes into the first's slot, with only what changed since it was written (about
    // half a second of the guest's 16 MiB/s).
    let third = g.checkpoint();
    assert_eq!(
        (third["seq"].as_u64(), third["full"].as_bool()),
        (Some(3), Some(false)),
        "{third}"
    );
    assert!(
        third["bytes_written"].as_u64().unwrap() < first["bytes_written"].as_u64().unwrap(),
        "an incremental checkpoint wrote as much as a whole one: {third} vs {first}"
    );
    assert!(third["pause_ms"].as_f64().unwrap() > 0.0, "{third}");
    assert_eq!(
        published(&g.ckpt),
        vec![
            format!("{}{:020}", vmm_api::CHECKPOINT_PREFIX, 2),
            format!("{}{:020}", vmm_api::CHECKPOINT_PREFIX, 3)
        ]
    );
    let at_third =
        counter_on_disk(&PathBuf::from(third["path"].as_str().unwrap()).join("disk-0.img"));
    let (ckpt, disk, _keep) = g.crash();
    assert!(
        counter_on_disk(&disk) > at_third + 2,
        "the guest did not run on"
    );

    let (vmm, stderr) = resume(&ckpt);
    let chosen = resumed_from(&stderr);
    assert_eq!(chosen["seq"].as_u64(), Some(3), "{chosen}");
    assert!(chosen["skipped"].as_array().unwrap().is_empty(), "{chosen}");
    // The disk went back to the checkpoint's instant: its counter is the guest's memory's.
    assert_resumed_consistently(&vmm, at_third);
    // Older checkpoints belong to the timeline the guest left: gone (removed while it runs).
    only_left(&ckpt, &format!("resumed-{:020}", 3));

    // The resumed VMM checkpoints again; its first writes a new slot whole.
    let (ok, out, err) = vmm.ctl(&["checkpoint", "--dir", ckpt.to_str().unwrap()]);
    assert!(ok, "{err}");
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (again["seq"].as_u64(), again["full"].as_bool()),
        (Some(4), Some(true)),
        "{again}"
    );
    assert_eq!(
        published(&ckpt),
        vec![format!("{}{:020}", vmm_api::CHECKPOINT_PREFIX, 4)]
    );
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_for_the_one_before() {
    let g = guest();
    let first = g.checkpoint();
    g.vmm.wait_for_console(
        &format!("tg: hb n={} ", last_heartbeat(&g.vmm.console_text()) + 2),
        TIMEOUT,
    );
    let second = g.checkpoint();
    let at_first =
        counter_on_disk(&PathBuf::from(first["path"].as_str().unwrap()).join("disk-0.img"));
    let newest = PathBuf::from(second["path"].as_str().unwrap());
    let (ckpt, _disk, _keep) = g.crash();
    // One flipped byte in the newest state's body: its CRC no longer matches.
    let state = newest.join("state.bin");
    let mut b = std::fs::read(&state).unwrap();
    let n = b.len();
    b[n - 10] ^= 0x55;
    std::fs::write(&state, b).unwrap();
    // A checkpoint being written when the host died is never looked at.
    std::fs::create_dir(ckpt.join(format!("{}{:020}.partial", vmm_api::CHECKPOINT_PREFIX, 3)))
        .unwrap();

    let (vmm, stderr) = resume(&ckpt);
    let chosen = resumed_from(&stderr);
    assert_eq!(chosen["seq"].as_u64(), Some(1), "{chosen}");
    let skipped = chosen["skipped"].to_string();
    assert!(
        skipped.contains("00000000000000000002") && skipped.contains("CRC"),
        "{skipped}"
    );
    // Memory and disk both from the first checkpoint, not the disk as the crash left it.
    assert_resumed_consistently(&vmm, at_first);
}

#[test]
fn without_a_usable_checkpoint_restore_fails_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint");
    std::fs::create_dir_all(ckpt.join(format!("{}{:020}", vmm_api::CHECKPOINT_PREFIX, 7))).unwrap();
    let (st, _, err) = run_vmm(&["restore", "--checkpoint", ckpt.to_str().unwrap()]);
    assert!(!st.success());
    assert!(
        err.contains("no usable checkpoint in")
            && err.contains("00000000000000000007: ")
            && err.contains("state.bin"),
        "{err}"
    );
    let (st, _, err) = run_vmm(&[
        "restore",
        "--checkpoint",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert!(
        !st.success() && err.contains("no usable checkpoint"),
        "{err}"
    );
}

#[test]
fn a_bad_checkpoint_request_is_refused_and_a_paused_guest_stays_paused() {
    let g = guest();
    // Straight on the socket: `vmm ctl` itself refuses an empty path.
    let answer = raw_request(&g.vmm.api, r#"{"command":"checkpoint","dir":""}"#);
    assert!(answer.contains("must be a path, not empty"), "{answer}");
    let elsewhere = tempfile::tempdir().unwrap();
    let (ok, _, err) = g
        .vmm
        .ctl(&["checkpoint", "--dir", elsewhere.path().to_str().unwrap()]);
    assert!(!ok && err.contains("outside"), "{err}");
    assert!(std::fs::read_dir(elsewhere.path())
        .unwrap()
        .next()
        .is_none());
    // A paused guest is checkpointed as it is, and stays paused.
    let (ok, _, err) = g.vmm.ctl(&["pause"]);
    assert!(ok, "{err}");
    let done = g.checkpoint();
    assert_eq!(done["rounds"].as_u64(), Some(0), "{done}");
    let (_, info, _) = g.vmm.ctl(&["info"]);
    assert!(info.contains("\"paused\""), "{info}");
}

/// The standby's `info`, once it answers.
fn standby_info(vmm: &RunningVmm) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (ok, out, err) = vmm.ctl(&["info"]);
        if ok {
            return serde_json::from_str(&out).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the standby does not answer: {err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_standby_at(vmm: &RunningVmm, seq: u64) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let info = standby_info(vmm);
        assert_eq!(info["state"], "standby", "{info}");
        if info["standby_seq"].as_u64() == Some(seq) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not follow checkpoint {seq}: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_standby_follows_each_checkpoint_and_promoted_goes_on_from_the_newest() {
    let g = guest();
    g.checkpoint();
    let (standby, stderr) = restore_checkpoint(&g.ckpt, &["--standby"]);
    let info = wait_standby_at(&standby, 1);
    assert_eq!(
        (info["vcpus"].as_u64(), info["memory_mib"].as_u64()),
        (Some(1), Some(128)),
        "{info}"
    );
    // A standby runs nothing and changes nothing.
    let (ok, _, err) = standby.ctl(&["pause"]);
    assert!(!ok && err.contains("standby"), "{err}");
    let (ok, _, err) = standby.ctl(&["checkpoint", "--dir", g.ckpt.to_str().unwrap()]);
    assert!(!ok && err.contains("standby"), "{err}");
    // Two whole checkpoints, then incremental ones: the standby follows each (after the first
    // it reads only what changed).
    let mut last = None;
    for seq in 2..=5 {
        g.vmm.wait_for_console(
            &format!("tg: hb n={} ", last_heartbeat(&g.vmm.console_text()) + 2),
            TIMEOUT,
        );
        let c = g.checkpoint();
        assert_eq!(c["seq"].as_u64(), Some(seq), "{c}");
        wait_standby_at(&standby, seq);
        last = Some(c);
    }
    let last = last.unwrap();
    assert_eq!(last["full"].as_bool(), Some(false), "{last}");
    assert_eq!(
        published(&g.ckpt),
        vec![
            format!("{}{:020}", vmm_api::CHECKPOINT_PREFIX, 4),
            format!("{}{:020}", vmm_api::CHECKPOINT_PREFIX, 5)
        ],
        "the standby touched the checkpoints"
    );
    assert!(
        standby.console_text().is_empty(),
        "the standby ran the guest: {}",
        standby.console_text()
    );
    let at_last =
        counter_on_disk(&PathBuf::from(last["path"].as_str().unwrap()).join("disk-0.img"));
    let (ckpt, disk, _keep) = g.crash();
    assert!(
        counter_on_disk(&disk) > at_last + 2,
        "the guest did not run on"
    );

    // Promoted: its own memory was the newest checkpoint's, nothing left to read.
    let (ok, out, err) = standby.ctl(&["promote"]);
    assert!(ok, "promote failed: {err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            p["seq"].as_u64(),
            p["warm"].as_bool(),
            p["pages_applied"].as_u64()
        ),
        (Some(5), Some(true), Some(0)),
        "{p}"
    );
    assert_eq!(resumed_from(&stderr)["seq"].as_u64(), Some(5));
    assert_resumed_consistently(&standby, at_last);
    let info = standby_info(&standby);
    assert_eq!(info["state"], "running", "{info}");
    // Taken: no other VMM can take the same checkpoint.
    only_left(&ckpt, &format!("resumed-{:020}", 5));
    let (ok, _, err) = standby.ctl(&["promote"]);
    assert!(!ok && err.contains("no standby"), "{err}");
}

#[test]
fn a_standby_skips_a_corrupt_checkpoint_and_is_promoted_from_the_one_it_holds() {
    let g = guest();
    g.checkpoint();
    g.checkpoint();
    let (standby, stderr) = restore_checkpoint(&g.ckpt, &["--standby"]);
    wait_standby_at(&standby, 2);
    let at_two = counter_on_disk(&g.ckpt.join(format!("ckpt-{:020}", 2)).join("disk-0.img"));
    // The next one is published corrupt (as a bad disk would leave it): the standby does not
    // take it, and the promotion skips it too, saying why.
    g.vmm.wait_for_console(
        &format!("tg: hb n={} ", last_heartbeat(&g.vmm.console_text()) + 2),
        TIMEOUT,
    );
    // Corrupted before the standby can look: it is stopped meanwhile.
    let stop = |sig: &str| {
        let st = Command::new("kill")
            .args([sig, &standby.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    stop("-STOP");
    let c = g.checkpoint();
    let state = PathBuf::from(c["path"].as_str().unwrap()).join("state.bin");
    let mut b = std::fs::read(&state).unwrap();
    let n = b.len();
    b[n - 10] ^= 0x55;
    std::fs::write(&state, b).unwrap();
    stop("-CONT");
    let _keep = g.crash();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(standby_info(&standby)["standby_seq"].as_u64(), Some(2));
    let (ok, out, err) = standby.ctl(&["promote"]);
    assert!(ok, "promote failed: {err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (p["seq"].as_u64(), p["warm"].as_bool()),
        (Some(2), Some(true)),
        "{p}"
    );
    let skipped = p["skipped"].to_string();
    assert!(
        skipped.contains(&format!("{:020}", 3)) && skipped.contains("CRC"),
        "{p}"
    );
    assert_eq!(resumed_from(&stderr)["seq"].as_u64(), Some(2));
    assert_resumed_consistently(&standby, at_two);
}

#[test]
fn a_standby_without_a_checkpoint_waits_and_a_shutdown_ends_it() {
    let shared = tempfile::tempdir().unwrap();
    let ckpt = shared.path().join("checkpoint");
    std::fs::create_dir(&ckpt).unwrap();
    let (mut standby, _stderr) = restore_checkpoint(&ckpt, &["--standby"]);
    let info = standby_info(&standby);
    assert_eq!(info["state"], "standby", "{info}");
    assert!(info.get("standby_seq").is_none(), "{info}");
    let (ok, _, _) = standby.ctl(&["shutdown"]);
    assert!(ok);
    assert!(standby.wait(TIMEOUT).success());
    // `--standby` needs `--checkpoint`.
    let (st, _, err) = run_vmm(&["restore", "--snapshot", "/nonexistent", "--standby"]);
    assert!(!st.success() && err.contains("--checkpoint"), "{err}");
}
