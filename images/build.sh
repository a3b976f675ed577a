#!/usr/bin/env bash
# Builds every guest image into images/out/ (git-ignored). Idempotent: finished artefacts are kept.
#
#   testguest.elf       the fast-lane test guest (PVH ELF, see docs/test-guest.md)
#   vmlinuz             Debian's linux-image-cloud-amd64 bzImage (the real-host guest kernel)
#   vmlinux             the same kernel decompressed: an ELF with a PVH note
#   guest-agent         the static guest agent (images/guest-agent)
#   initramfs.cpio.gz   busybox + the virtio modules (from modules.dep) + guest-agent + images/guest/init
#   modules/            the unpacked module tree (the nested lane's L1 reuses it for kvm.ko)
#
# Needs: gcc, binutils, cpio, lz4, kmod (depmod), busybox-static and apt-get (scripts/setup.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/out"
mkdir -p "$out"

log() { echo "images: $*" >&2; }

# --- the test guest: cheap, always rebuilt so it matches the source
"$here/testguest/build.sh" "$out/testguest.build" >/dev/null
cp "$out/testguest.build/testguest.elf" "$out/testguest.elf"
log "testguest.elf built"

# --- the guest agent: a static binary (the guest has no libc of ours)
repo=$(cd "$here/.." && pwd)
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release -p guest-agent --target x86_64-unknown-linux-gnu)
cp "$repo/target/x86_64-unknown-linux-gnu/release/guest-agent" "$out/guest-agent.tmp"
if ! cmp -s "$out/guest-agent.tmp" "$out/guest-agent" 2>/dev/null; then
    mv "$out/guest-agent.tmp" "$out/guest-agent"
else
    rm -f "$out/guest-agent.tmp"
fi
log "guest-agent built"

# --- Debian's cloud kernel and its modules
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
    echo "images: cannot resolve linux-image-cloud-amd64 (run 'apt-get update' first)" >&2
    exit 1
fi
kver=${pkg#linux-image-}
stamp="$out/.kernel-$kver"
if [ ! -f "$stamp" ]; then
    log "fetching $pkg"
    rm -rf "$out/deb" "$out/modules" && mkdir -p "$out/deb"
    (cd "$out/deb" && apt-get download "$pkg" >/dev/null)
    dpkg-deb -x "$out"/deb/*.deb "$out/deb/root"
    cp "$out/deb/root/boot/vmlinuz-$kver" "$out/vmlinuz"
    mkdir -p "$out/modules/lib/modules"
    mv "$out/deb/root/lib/modules/$kver" "$out/modules/lib/modules/"
    cp "$out/deb/root/boot/System.map-$kver" "$out/modules/System.map" 2>/dev/null || true
    # The .deb ships no modules.dep.
    depmod -b "$out/modules" "$kver"
    rm -rf "$out/deb"
    echo "$kver" > "$out/kernel-version"
    rm -f "$out/vmlinux"
    touch "$stamp"
fi

# --- vmlinux: the bzImage's LZ4 payload, decompressed (an ELF with a PVH note)
if [ ! -s "$out/vmlinux" ]; then
    python3 - "$out/vmlinuz" "$out/payload.lz4" <<'PY'
import struct, sys
data = open(sys.argv[1], 'rb').read()
setup_sects = data[0x1f1] or 4
payload_offset, payload_length = struct.unpack_from('<II', data, 0x248)
start = (setup_sects + 1) * 512 + payload_offset
open(sys.argv[2], 'wb').write(data[start:start + payload_length])
PY
    lz4 -dc "$out/payload.lz4" > "$out/vmlinux.tmp" 2>/dev/null || true
    rm -f "$out/payload.lz4"
    if [ "$(head -c 4 "$out/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" != "7f454c46" ]; then
        echo "images: the kernel payload did not decompress to an ELF" >&2
        exit 1
    fi
    mv "$out/vmlinux.tmp" "$out/vmlinux"
    log "vmlinux extracted"
fi

# --- the guest initramfs
kver=$(cat "$out/kernel-version")
moddir="$out/modules/lib/modules/$kver"
initramfs="$out/initramfs.cpio.gz"
inputs=("$here/guest/init" "$here/build.sh" /bin/busybox "$stamp" "$out/guest-agent")
if [ ! -s "$initramfs" ] || [ -n "$(find "${inputs[@]}" -newer "$initramfs" 2>/dev/null)" ]; then
    root="$out/initramfs.root"
    rm -rf "$root" && mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
    done
    # The virtio stack, in load order, with what modules.dep says each needs.
    mods="virtio_ring virtio virtio_mmio virtio_pci virtio_blk failover net_failover virtio_net virtio_balloon virtio_mem virtio_rng vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport ext4"
    : > "$root/etc/modules"
    for m in $mods; do
        for dep in $(modprobe -d "$out/modules" -S "$kver" --show-depends "$m" 2>/dev/null | awk '/^insmod/{print $2}'); do
            rel=${dep#"$out/modules/"}
            if [ ! -f "$root/$rel" ]; then
                mkdir -p "$root/$(dirname "$rel")"
                cp "$dep" "$root/$rel"
                echo "/$rel" >> "$root/etc/modules"
            fi
        done
    done
    cp "$out/guest-agent" "$root/bin/guest-agent"
    cp "$here/guest/init" "$root/init"
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$initramfs.tmp"
    mv "$initramfs.tmp" "$initramfs"
    rm -rf "$root"
    log "initramfs.cpio.gz built ($(du -h "$initramfs" | cut -f1))"
fi

# --- the Debian root filesystem: bookworm from Debian's packages (mmdebstrap, minbase + systemd),
# the guest agent and the power-loss scenario's disk writer as systemd services, on an ext4 image
# (rootfs.ext4, 512 MiB, sparse). The initramfs mounts it with guest.root=/dev/vda and hands over
# to systemd. An empty fstab: the root is mounted read-write already. (No D-Bus, so no logind:
# the guest ignores the ACPI power button and a VMM's stop is forced after its timeout.)
rootfs="$out/rootfs.ext4"
rinputs=("$here/build.sh" "$here/rootfs" "$out/guest-agent")
if [ ! -s "$rootfs" ] || [ -n "$(find "${rinputs[@]}" -newer "$rootfs" 2>/dev/null)" ]; then
    rdir="$out/rootfs.dir"
    rm -rf "$rdir"
    mmdebstrap --quiet --variant=minbase --include=systemd-sysv,udev bookworm "$rdir" \
        --customize-hook="copy-in $out/guest-agent $here/rootfs/disk-writer /usr/local/bin" \
        --customize-hook="copy-in $here/rootfs/disk-writer.service $here/rootfs/guest-agent.service /etc/systemd/system" \
        --customize-hook='chroot "$1" systemctl enable disk-writer.service guest-agent.service' \
        --customize-hook='chroot "$1" systemctl mask serial-getty@ttyS0.service getty@tty1.service' \
        --customize-hook='echo debian-guest > "$1/etc/hostname"; : > "$1/etc/fstab"'
    chmod 0755 "$rdir/usr/local/bin/guest-agent" "$rdir/usr/local/bin/disk-writer"
    rm -f "$rootfs.tmp"
    mkfs.ext4 -q -F -L root -d "$rdir" "$rootfs.tmp" 512M
    mv "$rootfs.tmp" "$rootfs"
    rm -rf "$rdir"
    log "rootfs.ext4 built"
fi
