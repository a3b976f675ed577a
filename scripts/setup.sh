#!/usr/bin/env bash
# Installs what building and testing need, from Debian's packages. Idempotent: installs only what
# is missing, and refreshes the package lists only when it has to install something.
set -euo pipefail
packages=(
    gcc binutils make        # the test guest
    cpio lz4 kmod            # guest images: initramfs, kernel payload, depmod/modprobe
    busybox-static           # guest and L1 userland
    acpica-tools             # iasl, to check our ACPI tables
    qemu-system-x86          # the nested lane's L1, and the peer in benchmarks
    python3 python3-venv iproute2 procps curl   # python3-venv: scripts/api-fuzz.sh (Schemathesis)
    iputils-ping             # the fleet test pings a VM across its migration
    nats-server              # the queue (vimd starts its own by default)
    postgresql               # the VIM's database on PostgreSQL (SQLite is built in)
    mmdebstrap e2fsprogs     # the Debian root-filesystem disk image (images/build.sh)
    nfs-ganesha nfs-ganesha-vfs   # NFS shared storage in the nested power-loss scenario
    chromium chromium-driver python3-selenium   # the dashboard, tested in a real browser
    python3-prometheus-client   # its text-format parser checks /metrics in the fleet tests
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# apt-get download (images/build.sh) needs current package lists.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
fi
if [ ! -c /dev/kvm ]; then
    echo "setup: /dev/kvm is missing: this machine cannot run KVM guests" >&2
    exit 1
fi
# The user vim-agent runs its VMMs as (docs/sandbox.md), made as the fleet-agent package makes it.
if ! getent passwd vim-vmm >/dev/null; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    getent group kvm >/dev/null || $SUDO groupadd --system kvm
    $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --gid kvm vim-vmm
fi
