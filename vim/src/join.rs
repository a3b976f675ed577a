//! Joining a host in one line (docs/packages.md): `vimctl host add NAME --join` makes a single-use
//! join token; the command it prints fetches `GET /join/TOKEN` over TLS pinned to vimd's key,
//! which spends the token and answers this shell script. The script downloads the fleet-agent
//! package from vimd, installs it, and writes the host's configuration, its queue credentials
//! (issued anew for the join, so they exist only in the script's answer and on the host) and the
//! queue's CA; then it starts the agent. The credentials never appear on a command line.

use thiserror::Error;

/// What the script needs; every field is checked before it goes into shell text.
pub struct Join<'a> {
    pub host_id: &'a str,
    /// Where the host reached vimd (`https://ADDR:PORT`), to fetch the package from.
    pub base_url: &'a str,
    /// curl's `--pinnedpubkey` for vimd's key (None: vimd's certificate is verified by the
    /// system's roots, or the API is plain HTTP on loopback).
    pub pin: Option<&'a str>,
    pub nats_url: &'a str,
    /// `{"user": ..., "password": ...}`.
    pub credentials_json: &'a str,
    pub nats_ca_pem: Option<&'a str>,
    pub shared_dir: &'a str,
}

#[derive(Debug, Error, PartialEq)]
#[error("{what} {got:?} cannot go into the join script")]
pub struct Unsafe {
    what: &'static str,
    got: String,
}

/// Text that goes into the script between single quotes or in a quoted here-document: no
/// quote, no `$`, backtick or backslash, no line break, printable ASCII.
fn plain(what: &'static str, s: &str) -> Result<(), Unsafe> {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'\'' | b'"' | b'$' | b'`' | b'\\'))
    {
        Ok(())
    } else {
        Err(Unsafe {
            what,
            got: s.chars().take(80).collect(),
        })
    }
}

/// The curl options that make the TLS connection to vimd trusted.
pub fn curl_tls(pin: Option<&str>) -> String {
    match pin {
        // -k: no CA to check against on a new host; the pin checks vimd's key instead.
        Some(p) => format!("-k --pinnedpubkey '{p}'"),
        None => String::new(),
    }
}

/// The one line to run on the new host. Without curl's `-f`: a refusal's answer is a script too,
/// which says why and makes the line fail (a pipeline's status is its last command's).
pub fn command(base_url: &str, token: &str, pin: Option<&str>) -> String {
    let tls = curl_tls(pin);
    let sep = if tls.is_empty() { "" } else { " " };
    format!("curl -sS{sep}{tls} '{base_url}/join/{token}' | sh")
}

pub fn script(j: &Join) -> Result<String, Unsafe> {
    plain("host id", j.host_id)?;
    plain("vimd's address", j.base_url)?;
    if let Some(p) = j.pin {
        plain("pin", p)?;
    }
    plain("NATS URL", j.nats_url)?;
    plain("shared directory", j.shared_dir)?;
    if !j.shared_dir.starts_with('/') {
        return Err(Unsafe {
            what: "shared directory (not absolute)",
            got: j.shared_dir.into(),
        });
    }
    // Here-documents end at a line of their own: the payloads have no such line.
    for (what, doc) in [
        ("credentials", j.credentials_json),
        ("CA", j.nats_ca_pem.unwrap_or("")),
    ] {
        if doc.lines().any(|l| l.starts_with("VIM_JOIN_")) || doc.contains('\0') {
            return Err(Unsafe {
                what,
                got: doc.chars().take(80).collect(),
            });
        }
    }
    let tls = curl_tls(j.pin);
    let ca = match j.nats_ca_pem {
        Some(pem) => format!(
            "cat > \"$root/etc/vim-agent/nats-ca.pem\" <<'VIM_JOIN_CA'\n{}\nVIM_JOIN_CA\n",
            pem.trim_end()
        ),
        None => String::new(),
    };
    // agent.toml, a line each; "$root" is expanded by the shell, the rest was checked plain.
    let mut config = vec![
        format!("host_id = \\\"{}\\\"", j.host_id),
        format!("nats_url = \\\"{}\\\"", j.nats_url),
        "credentials = \\\"$root/etc/vim-agent/credentials.json\\\"".to_string(),
        "state_dir = \\\"$root/var/lib/vim-agent\\\"".to_string(),
        format!("shared_dir = \\\"{}\\\"", j.shared_dir),
        "vmm = \\\"$root/usr/bin/vmm\\\"".to_string(),
    ];
    if j.nats_ca_pem.is_some() {
        config.push("nats_ca = \\\"$root/etc/vim-agent/nats-ca.pem\\\"".to_string());
    }
    let config: String = config.iter().map(|l| format!("    \"{l}\" \\\n")).collect();
    Ok(format!(
        r#"#!/bin/sh
# Joins this machine to the fleet as host '{host}'. Made by vimd for one join token, now spent.
# VIM_JOIN_ROOT=DIR installs under DIR instead of / and starts nothing (images, tests).
set -eu
root="${{VIM_JOIN_ROOT:-}}"
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then echo "join: run this as root" >&2; exit 1; fi
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsS {tls} -o "$tmp/fleet-agent.deb" '{base}/packages/fleet-agent.deb'
if [ -z "$root" ]; then
    apt-get install -y "$tmp/fleet-agent.deb" >/dev/null
else
    dpkg-deb -x "$tmp/fleet-agent.deb" "$root"
fi
install -d -m 0700 "$root/etc/vim-agent" "$root/var/lib/vim-agent"
cat > "$root/etc/vim-agent/credentials.json" <<'VIM_JOIN_CREDENTIALS'
{creds}
VIM_JOIN_CREDENTIALS
{ca}printf '%s\n' \
{config}    > "$root/etc/vim-agent/agent.toml"
"$root/usr/bin/vim-agent" --config "$root/etc/vim-agent/agent.toml" --check >/dev/null
if [ -z "$root" ]; then
    systemctl daemon-reload
    systemctl enable vim-agent >/dev/null 2>&1
    systemctl restart vim-agent
    echo "join: this machine is host {host}; vim-agent is running"
else
    echo "join: host {host} installed under $root; run $root/usr/bin/vim-agent --config $root/etc/vim-agent/agent.toml"
fi
"#,
        host = j.host_id,
        tls = tls,
        base = j.base_url,
        creds = j.credentials_json.trim_end(),
        ca = ca,
        config = config,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join<'a>(shared: &'a str, host: &'a str) -> Join<'a> {
        Join {
            host_id: host,
            base_url: "https://10.0.0.1:8640",
            pin: Some("sha256//abc+/="),
            nats_url: "tls://10.0.0.1:4222",
            credentials_json: r#"{"user":"host-h3","password":"s3cret"}"#,
            nats_ca_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
            shared_dir: shared,
        }
    }

    /// The script is valid shell (`sh -n`), carries the credentials in a quoted here-document
    /// and pins the package download; the command line has the token, never the credentials.
    #[test]
    fn the_script_parses_and_the_command_has_no_secret() {
        let s = script(&join("/srv/shared", "h3")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join.sh");
        std::fs::write(&path, &s).unwrap();
        let st = std::process::Command::new("sh")
            .arg("-n")
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success(), "{s}");
        assert!(s.contains("<<'VIM_JOIN_CREDENTIALS'\n{\"user\":\"host-h3\",\"password\":\"s3cret\"}\nVIM_JOIN_CREDENTIALS"));
        assert!(s.contains("--pinnedpubkey 'sha256//abc+/=' -o"));
        let c = command("https://10.0.0.1:8640", "t0k3n", Some("sha256//abc+/="));
        assert_eq!(
            c,
            "curl -sS -k --pinnedpubkey 'sha256//abc+/=' 'https://10.0.0.1:8640/join/t0k3n' | sh"
        );
        assert!(!c.contains("s3cret"));
    }

    /// Nothing that could break out of the quoting gets in.
    #[test]
    fn unsafe_values_are_refused() {
        assert!(script(&join("/srv/$(reboot)", "h3")).is_err());
        assert!(script(&join("/srv/a'b", "h3")).is_err());
        assert!(script(&join("relative", "h3")).is_err());
        assert!(script(&join("/srv", "h 3")).is_err());
        let mut j = join("/srv", "h3");
        j.credentials_json = "x\nVIM_JOIN_CREDENTIALS\nreboot";
        assert!(script(&j).is_err());
    }
}
