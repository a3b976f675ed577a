#!/usr/bin/env bash
# Builds the Debian packages under target/debian/ (cargo-deb, configured in agent/Cargo.toml and
# vim/Cargo.toml; docs/packages.md):
#   fleet-agent_VERSION-REV_ARCH.deb   vim-agent + vmm, systemd unit, /etc/vim-agent, user vim-vmm
#   fleet-vim_VERSION-REV_ARCH.deb     vimd + vimctl, systemd unit, /var/lib/vimd (0700), and
#                                      the fleet-agent package vimd serves to joining hosts
# with fleet-agent.deb and fleet-vim.deb beside them (the latest build).
# Usage: scripts/package.sh [REVISION]   (default 1; a higher one makes an upgrade)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-1}
version=3.6.2
if ! cargo deb --version 2>/dev/null | grep -q "$version"; then
    cargo install cargo-deb --locked --version "$version"
fi
cargo build --release -p vim-agent -p vim
mkdir -p target/static
cp "$(scripts/build-vmm.sh)" target/static/vmm
mkdir -p target/debian
agent=$(cargo deb -p vim-agent --no-build --deb-revision "$rev" | tail -n 1)
cp "$agent" target/debian/fleet-agent.deb
vim=$(cargo deb -p vim --no-build --deb-revision "$rev" | tail -n 1)
cp "$vim" target/debian/fleet-vim.deb
echo "$agent"
echo "$vim"
