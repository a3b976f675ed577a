//! Issue 19's packages in a fresh Debian root (mmdebstrap, bookworm minbase with systemd):
//! `dpkg -i` in a chroot installs fleet-agent and fleet-vim with their files, modes, units and
//! user; `vim-agent --check` accepts a configuration as the join script writes it; a newer
//! revision upgrades over it keeping the host's configuration; removal keeps the configuration
//! and purge leaves nothing of either package behind. (No systemd runs in a chroot: that the
//! units stop and start on upgrade is the maintainer scripts' `deb-systemd-invoke`, and that
//! running VMs survive an agent restart is the fleet tests' re-adoption.)

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(what: &str, c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{said}");
    said
}

fn chroot(root: &Path, args: &[&str]) -> String {
    run(
        &format!("chroot {}", args.join(" ")),
        Command::new("chroot").arg(root).args(args),
    )
}

/// Every path under `root` but the package manager's own records and caches, which install and
/// purge are meant to change.
fn tree(root: &Path) -> BTreeSet<String> {
    let out = run(
        "find",
        Command::new("find")
            .arg(root)
            .args(["-xdev", "-mindepth", "1"]),
    );
    out.lines()
        .map(|l| l.strip_prefix(root.to_str().unwrap()).unwrap().to_string())
        .filter(|p| {
            ![
                "/var/lib/dpkg",
                "/var/log",
                "/var/cache",
                "/tmp",
                "/run",
                "/proc",
                "/dev",
            ]
            .iter()
            .any(|skip| p.starts_with(skip))
                && !p.starts_with("/etc/passwd")
                && !p.starts_with("/etc/group")
                && !p.starts_with("/etc/shadow")
                && !p.starts_with("/etc/gshadow")
                && !p.starts_with("/etc/subuid")
                && !p.starts_with("/etc/subgid")
                && !p.starts_with("/var/lib/systemd/deb-systemd-helper")
        })
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn packages_install_upgrade_remove_and_purge_in_a_fresh_debian() {
    let deb = repo().join("target/debian");
    let (agent, vim) = (deb.join("fleet-agent.deb"), deb.join("fleet-vim.deb"));
    assert!(
        agent.exists() && vim.exists(),
        "no packages in target/debian: run scripts/package.sh (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    // A newer revision of the agent package, from the same binaries.
    let newer = run(
        "cargo deb (revision 2)",
        Command::new("cargo")
            .current_dir(repo())
            .args([
                "deb",
                "-p",
                "vim-agent",
                "--no-build",
                "--deb-revision",
                "2",
                "-o",
            ])
            .arg(dir.path().join("fleet-agent-2.deb")),
    );
    assert!(newer.contains("fleet-agent-2.deb"), "{newer}");
    let root = dir.path().join("root");
    run(
        "mmdebstrap",
        Command::new("mmdebstrap")
            .args([
                "--quiet",
                "--variant=minbase",
                "--include=systemd,iproute2,passwd,nats-server",
                "bookworm",
            ])
            .arg(&root),
    );
    for f in [&agent, &vim, &dir.path().join("fleet-agent-2.deb")] {
        std::fs::copy(f, root.join("tmp").join(f.file_name().unwrap())).unwrap();
    }
    let before = tree(&root);

    // Install.
    chroot(
        &root,
        &["dpkg", "-i", "/tmp/fleet-agent.deb", "/tmp/fleet-vim.deb"],
    );
    for (p, m) in [
        ("usr/bin/vim-agent", 0o755),
        ("usr/bin/vmm", 0o755),
        ("usr/bin/vimd", 0o755),
        ("usr/bin/vimctl", 0o755),
        ("etc/vim-agent", 0o700),
        ("var/lib/vim-agent", 0o700),
        ("usr/lib/systemd/system/vim-agent.service", 0o644),
        ("usr/lib/systemd/system/vimd.service", 0o644),
        ("usr/share/fleet-vim/packages/fleet-agent.deb", 0o644),
        ("etc/default/vimd", 0o644),
    ] {
        assert_eq!(mode(&root.join(p)), m, "{p}");
    }
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/vim-agent.service")).unwrap();
    assert!(unit.contains("KillMode=process"), "{unit}");
    let vimd_unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/vimd.service")).unwrap();
    assert!(vimd_unit.contains("StateDirectoryMode=0700"), "{vimd_unit}");
    // systemd (installed in the root, not running) accepts both units as installed: their
    // settings, and programs where they name them. A setting it cannot parse is only a warning
    // (status 0): any output is a failure.
    let verified = chroot(
        &root,
        &[
            "systemd-analyze",
            "verify",
            "/usr/lib/systemd/system/vim-agent.service",
            "/usr/lib/systemd/system/vimd.service",
        ],
    );
    assert!(
        verified.trim().is_empty(),
        "systemd-analyze verify: {verified}"
    );
    // Enabled for boot.
    for u in ["vim-agent", "vimd"] {
        let link = root.join(format!(
            "etc/systemd/system/multi-user.target.wants/{u}.service"
        ));
        assert!(link.symlink_metadata().is_ok(), "{u} is not enabled");
    }
    // The VMMs' user, in the kvm group.
    let user = chroot(&root, &["id", "vim-vmm"]);
    assert!(user.contains("(kvm)"), "{user}");
    // A configuration as the join script writes it passes the agent's check.
    std::fs::write(
        root.join("etc/vim-agent/agent.toml"),
        "host_id = \"h9\"\nnats_url = \"tls://10.0.0.1:4222\"\n\
         credentials = \"/etc/vim-agent/credentials.json\"\nstate_dir = \"/var/lib/vim-agent\"\n\
         shared_dir = \"/srv/shared\"\nvmm = \"/usr/bin/vmm\"\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/vim-agent/credentials.json"),
        r#"{"user":"host-h9","password":"x"}"#,
    )
    .unwrap();
    let check = chroot(
        &root,
        &[
            "vim-agent",
            "--config",
            "/etc/vim-agent/agent.toml",
            "--check",
        ],
    );
    assert!(check.contains("h9"), "{check}");
    let version = |root: &Path| chroot(root, &["dpkg-query", "-W", "-f=${Version}", "fleet-agent"]);
    assert_eq!(version(&root), "0.1.0-1");

    // Upgrade: the new revision replaces the files and keeps the host's configuration.
    chroot(&root, &["dpkg", "-i", "/tmp/fleet-agent-2.deb"]);
    assert_eq!(version(&root), "0.1.0-2");
    assert!(
        std::fs::read_to_string(root.join("etc/vim-agent/agent.toml"))
            .unwrap()
            .contains("h9")
    );

    // Remove: the programs go, the configuration stays; purge: nothing of it stays.
    chroot(&root, &["dpkg", "-r", "fleet-agent", "fleet-vim"]);
    assert!(!root.join("usr/bin/vim-agent").exists());
    assert!(!root.join("usr/bin/vimd").exists());
    assert!(root.join("etc/vim-agent/agent.toml").exists());
    chroot(&root, &["dpkg", "-P", "fleet-agent", "fleet-vim"]);
    let after = tree(&root);
    let left: Vec<&String> = after.difference(&before).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let gone: Vec<&String> = before.difference(&after).collect();
    assert!(gone.is_empty(), "removed what was there before: {gone:?}");
    assert!(!chroot(&root, &["getent", "passwd"]).contains("vim-vmm"));
}
