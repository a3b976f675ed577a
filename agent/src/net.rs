//! The host's side of VM networking: one Linux bridge per host (created if missing) and a tap per
//! VM on it, named after the VM so that the same name exists on whichever host the VM runs (a
//! migrated VM's VMM opens its tap by the name its state carries). Done with `ip` (iproute2).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// The tap of VM `id` on every host: `vt` and the id's first 13 characters (IFNAMSIZ is 16).
pub fn tap_name(id: &str) -> String {
    format!("vt{}", id.chars().take(13).collect::<String>())
}

fn exists(dev: &str) -> bool {
    Path::new("/sys/class/net").join(dev).exists()
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Creates the bridge if it is missing, and brings it up.
pub fn ensure_bridge(bridge: &str) -> Result<()> {
    if !exists(bridge) {
        ip(&["link", "add", "name", bridge, "type", "bridge"])?;
        tracing::info!(bridge, "created the VM bridge");
    }
    ip(&["link", "set", bridge, "up"])
}

/// The VM's tap, on the bridge and up (created if missing: a restarted agent finds it there).
/// With `owner`, the tap belongs to that user, whose VMM attaches to it without CAP_NET_ADMIN;
/// one left with another owner (by an agent before the jail) is made again, as no VMM of the
/// VM runs while its tap is ensured.
pub fn ensure_tap(id: &str, bridge: &str, owner: Option<u32>) -> Result<String> {
    let tap = tap_name(id);
    let owned_by = |uid: u32| {
        std::fs::read_to_string(Path::new("/sys/class/net").join(&tap).join("owner"))
            .is_ok_and(|o| o.trim() == uid.to_string())
    };
    if let Some(uid) = owner {
        if exists(&tap) && !owned_by(uid) {
            ip(&["link", "del", &tap])?;
        }
    }
    if !exists(&tap) {
        match owner {
            Some(uid) => ip(&[
                "tuntap",
                "add",
                "dev",
                &tap,
                "mode",
                "tap",
                "user",
                &uid.to_string(),
            ])?,
            None => ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?,
        }
    }
    ip(&["link", "set", &tap, "master", bridge, "up"])?;
    Ok(tap)
}

/// Removes the VM's tap, if there is one.
pub fn remove_tap(id: &str) {
    let tap = tap_name(id);
    if exists(&tap) {
        if let Err(e) = ip(&["link", "del", &tap]) {
            tracing::warn!(tap, error = %e, "cannot remove the VM's tap");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz() {
        let t = tap_name("0123456789abcdef0123456789abcdef");
        assert_eq!(t, "vt0123456789abc");
        assert!(t.len() <= 15);
        assert_eq!(tap_name("vm1"), "vtvm1");
    }
}
