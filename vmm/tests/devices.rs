//! Fast lane: what virtio devices need no guest driver for — placement in the DSDT, disk locks,
//! flags. Device behaviour with real drivers is tested in the nested lane (integration/).

mod common;
use common::*;

fn image(dir: &std::path::Path, name: &str, mib: u64) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn devices_appear_in_the_dsdt_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 8);
    let b = image(dir.path(), "b.img", 8);
    let kernel = test_guest().to_str().unwrap();
    let (status, out, err) = run_vmm(&[
        "run",
        "--kernel",
        kernel,
        "--disk",
        &a,
        "--disk",
        &format!("{b},ro"),
        "--rng",
        "--cmdline",
        "tg.mode=poweroff",
    ]);
    assert!(status.success(), "{err}");
    let virtio: Vec<&str> = out.lines().filter(|l| l.contains("hid=LNRO0005")).collect();
    assert_eq!(
        virtio,
        [
            "tg: device hid=LNRO0005 mmio=0xd0000000+0x1000 irq=16",
            "tg: device hid=LNRO0005 mmio=0xd0001000+0x1000 irq=17",
            "tg: device hid=LNRO0005 mmio=0xd0002000+0x1000 irq=18",
        ],
        "{out}"
    );
    assert!(out.contains("virtio=3"), "{out}");
}

#[test]
fn a_locked_disk_is_refused_and_the_owner_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "shared.img", 8);
    let first = RunningVmm::start(&["--disk", &disk, "--cmdline", "tg.mode=hold"]);
    let kernel = test_guest().to_str().unwrap();
    for second in [disk.clone(), format!("{disk},ro")] {
        let (status, _, err) = run_vmm(&["run", "--kernel", kernel, "--disk", &second]);
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(
            err.contains("in use by another VMM") && err.contains("shared.img"),
            "{err}"
        );
    }
    let (ok, out, _) = first.ctl(&["info"]);
    assert!(ok && out.contains("running"), "{out}");
    drop(first);
    // Released on exit: the next VMM gets it.
    let (status, _, err) = run_vmm(&[
        "run",
        "--kernel",
        kernel,
        "--disk",
        &disk,
        "--cmdline",
        "tg.mode=poweroff",
    ]);
    assert!(status.success(), "{err}");
}

#[test]
fn read_only_disks_share() {
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "base.img", 8);
    let ro = format!("{disk},ro");
    let _first = RunningVmm::start(&["--disk", &ro, "--cmdline", "tg.mode=hold"]);
    let kernel = test_guest().to_str().unwrap();
    let (status, _, err) = run_vmm(&[
        "run",
        "--kernel",
        kernel,
        "--disk",
        &ro,
        "--cmdline",
        "tg.mode=poweroff",
    ]);
    assert!(status.success(), "{err}");
}

#[test]
fn bad_disk_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = test_guest().to_str().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    for (disk, expect) in [
        ("/nonexistent/disk.img".to_string(), "/nonexistent/disk.img"),
        (format!("{},rx", odd.display()), "--disk"),
        (odd.to_str().unwrap().to_string(), "512-byte sectors"),
    ] {
        let (status, _, err) = run_vmm(&["run", "--kernel", kernel, "--disk", &disk]);
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains(expect), "{disk}: {err}");
    }
}
