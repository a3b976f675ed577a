//! scripts/install-agent.sh: a dry run changes nothing; an install under a staging root writes the
//! binaries, a configuration the agent accepts, the credentials readable only by root, and a
//! systemd unit that restarts the agent and leaves its VMMs running when it stops.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn install_agent_writes_a_unit_and_a_valid_config() {
    // The packages' set (scripts/package.sh): built alone, vim-agent's dependencies get other
    // features, and the whole release tree was built again (about 150 s of the suite).
    let st = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args(["build", "--release", "-p", "vim-agent", "-p", "vim"])
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new(repo().join("scripts/build-vmm.sh"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("h1.creds");
    std::fs::write(&creds, r#"{"user":"host-h1","password":"x"}"#).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let root = dir.path().join("root");
    let script = repo().join("scripts/install-agent.sh");
    let args = |extra: &[&str]| {
        let mut c = Command::new(&script);
        c.args([
            "--host-id",
            "h1",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--shared-dir",
            "/srv/shared",
        ])
        .arg("--credentials")
        .arg(&creds)
        .arg("--nats-ca")
        .arg(&ca)
        .arg("--root")
        .arg(&root)
        .args(extra);
        c.output().unwrap()
    };

    let dry = args(&["--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(text.contains("KillMode=process"), "{text}");
    assert!(!root.exists(), "a dry run wrote files");

    let out = args(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/vim-agent.service")).unwrap();
    for want in [
        "ExecStart=/usr/local/bin/vim-agent --config /etc/vim-agent/agent.toml",
        "Restart=always",
        "KillMode=process",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(want), "unit lacks {want}:\n{unit}");
    }
    let toml = std::fs::read_to_string(root.join("etc/vim-agent/agent.toml")).unwrap();
    assert!(
        toml.contains("host_id = \"h1\"")
            && toml.contains("/usr/local/bin/vmm")
            && toml.contains("nats_ca = \"/etc/vim-agent/nats-ca.pem\""),
        "{toml}"
    );
    assert_eq!(
        std::fs::read(root.join("etc/vim-agent/nats-ca.pem")).unwrap(),
        std::fs::read(&ca).unwrap()
    );
    let mode = std::fs::metadata(root.join("etc/vim-agent/credentials.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The installed agent accepts the installed configuration.
    let check = Command::new(root.join("usr/local/bin/vim-agent"))
        .arg("--config")
        .arg(root.join("etc/vim-agent/agent.toml"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("\"h1\""));
    // A configuration with an unknown key is refused.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("{toml}\nbogus = 1\n")).unwrap();
    let r = Command::new(root.join("usr/local/bin/vim-agent"))
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("bogus"));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let v = Command::new("systemd-analyze")
            .arg("verify")
            .arg(root.join("etc/systemd/system/vim-agent.service"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&v.stderr);
        // The binary path is under the staging root, so only syntax problems count here.
        assert!(
            !err.contains("Unknown key") && !err.contains("Invalid"),
            "{err}"
        );
    }
}
