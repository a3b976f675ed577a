#!/usr/bin/env bash
# Installs vim-agent (and the vmm it runs) on a Linux host as a systemd service.
#
#   scripts/install-agent.sh --host-id ID --nats-url URL --credentials FILE --shared-dir DIR \
#       [--nats-ca FILE] [--heartbeat-ms N] [--prefix /usr/local] [--root /] [--dry-run]
#
# Binaries come from target/release (cargo build --release -p vim-agent -p vmm). The credentials
# file is what `vimctl host add ID --json` named; the NATS CA is its `nats_ca_pem` saved to a file
# (or `nats_ca_file`). Writes:
#   PREFIX/bin/vim-agent, PREFIX/bin/vmm
#   /etc/vim-agent/agent.toml, /etc/vim-agent/credentials.json (0600), /etc/vim-agent/nats-ca.pem
#   /etc/systemd/system/vim-agent.service
# then enables and starts the service. --root installs under another root (and starts nothing);
# --dry-run prints the files it would write and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
host_id="" nats_url="" creds="" ca="" shared="" heartbeat=1000 prefix=/usr/local root="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --host-id) host_id=$2; shift 2 ;;
        --nats-url) nats_url=$2; shift 2 ;;
        --credentials) creds=$2; shift 2 ;;
        --nats-ca) ca=$2; shift 2 ;;
        --shared-dir) shared=$2; shift 2 ;;
        --heartbeat-ms) heartbeat=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        *) echo "install-agent: unknown argument $1" >&2; exit 2 ;;
    esac
done
for v in host_id nats_url creds shared; do
    [ -n "${!v}" ] || { echo "install-agent: --${v//_/-} is required" >&2; exit 2; }
done
[ -r "$creds" ] || { echo "install-agent: cannot read $creds" >&2; exit 2; }
[ -z "$ca" ] || [ -r "$ca" ] || { echo "install-agent: cannot read $ca" >&2; exit 2; }
vmm_bin=target/x86_64-unknown-linux-gnu/release/vmm
for b in target/release/vim-agent "$vmm_bin"; do
    [ -x "$b" ] || { echo "install-agent: $b missing (cargo build --release -p vim-agent; scripts/build-vmm.sh)" >&2; exit 2; }
done

config="host_id = \"$host_id\"
nats_url = \"$nats_url\"
credentials = \"/etc/vim-agent/credentials.json\"
state_dir = \"/var/lib/vim-agent\"
shared_dir = \"$shared\"
vmm = \"$prefix/bin/vmm\"
heartbeat_ms = $heartbeat"
[ -n "$ca" ] && config="$config
nats_ca = \"/etc/vim-agent/nats-ca.pem\""

unit="[Unit]
Description=vim-agent: the VIM's host agent (runs this host's VMs)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=$prefix/bin/vim-agent --config /etc/vim-agent/agent.toml
Restart=always
RestartSec=2
# The VMMs it starts must outlive an agent restart: only the agent's own process is stopped; the
# new agent re-adopts them.
KillMode=process
StateDirectory=vim-agent

[Install]
WantedBy=multi-user.target"

if [ "$dry" = 1 ]; then
    echo "would install target/release/vim-agent and $vmm_bin to $root$prefix/bin/"
    echo "would write $root/etc/vim-agent/agent.toml:"; echo "$config" | sed 's/^/    /'
    echo "would copy $creds to $root/etc/vim-agent/credentials.json (mode 0600)"
    [ -n "$ca" ] && echo "would copy $ca to $root/etc/vim-agent/nats-ca.pem"
    echo "would write $root/etc/systemd/system/vim-agent.service:"; echo "$unit" | sed 's/^/    /'
    [ -z "$root" ] && echo "would run: systemctl daemon-reload && systemctl enable --now vim-agent"
    exit 0
fi
install -d "$root$prefix/bin" "$root/etc/vim-agent" "$root/etc/systemd/system" "$root/var/lib/vim-agent"
install -m 0755 target/release/vim-agent "$vmm_bin" "$root$prefix/bin/"
echo "$config" > "$root/etc/vim-agent/agent.toml"
install -m 0600 "$creds" "$root/etc/vim-agent/credentials.json"
[ -z "$ca" ] || install -m 0644 "$ca" "$root/etc/vim-agent/nats-ca.pem"
echo "$unit" > "$root/etc/systemd/system/vim-agent.service"
# The user the agent runs its VMMs as (docs/sandbox.md), as the fleet-agent package makes it.
if [ -z "$root" ] && ! getent passwd vim-vmm >/dev/null; then
    getent group kvm >/dev/null || groupadd --system kvm
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --gid kvm vim-vmm
fi
# The configuration must be one the agent accepts.
"$root$prefix/bin/vim-agent" --config "$root/etc/vim-agent/agent.toml" --check >/dev/null
if [ -z "$root" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now vim-agent
    echo "install-agent: vim-agent enabled and started"
else
    echo "install-agent: installed under ${root:-/} (not started)"
fi
