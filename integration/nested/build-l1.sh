#!/usr/bin/env bash
# Builds the nested lane's L1 base image: an uncompressed initramfs for Debian's cloud kernel running
# under QEMU TCG (-cpu max gives it SVM + NPT, so kvm_amd provides a real /dev/kvm), holding
#   - busybox, irqbypass.ko, kvm.ko, kvm-amd.ko (that order, from modules.dep), and tun.ko,
#   - our vmm with the shared libraries ldd lists and the dynamic loader,
#   - the L2 guest: images/out/vmlinuz + initramfs.cpio.gz,
#   - with L1_VIM_BINS=DIR: the fleet (vimd, vimctl, vim-agent from DIR, nats-server) and
#     iproute2's ip (network namespaces, bridges, taps) in place of busybox's, curl, dpkg-deb and
#     GNU tar (a host's join), the user vim-vmm (uid and gid 64000), and the modules
#     for a virtio NIC and an NFS mount, and softdog (modules/watchdog/, loaded by its scenario),
#   - /lib/l1.sh: the helpers scenarios use, and a base /init that only reports "no scenario".
# A scenario is a second, small cpio whose /init replaces the base one (see run-l1.sh).
#
# Usage: build-l1.sh VMM_BINARY OUT_DIR      (needs images/build.sh to have run)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
vmm=${1:?usage: build-l1.sh VMM_BINARY OUT_DIR}
out=${2:?usage: build-l1.sh VMM_BINARY OUT_DIR}
images="$repo/images/out"
for f in vmlinuz initramfs.cpio.gz kernel-version guest-agent; do
    [ -e "$images/$f" ] || { echo "build-l1: $images/$f missing: run images/build.sh" >&2; exit 1; }
done
kver=$(cat "$images/kernel-version")
mkdir -p "$out"
root="$out/l1.root"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,lib,lib64,l2,modules}

cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
done

# kvm-amd for /dev/kvm; tun for the taps our vmm creates; with the fleet, veth and bridge for its
# hosts' network namespaces and VM bridges, and virtio_pci, virtio_net and nfsv4 for an L1 that is
# a host of a fleet run outside it (power-loss: QEMU's user network, the NFS share).
mods="kvm-amd tun"
[ -n "${L1_VIM_BINS:-}" ] && mods="$mods veth bridge virtio_pci virtio_net nfsv4"
for mod in $mods; do
    for dep in $(modprobe -d "$images/modules" -S "$kver" --show-depends "$mod" | awk '/^insmod/{print $2}'); do
        [ -e "$root/modules/$(basename "$dep")" ] && continue
        cp "$dep" "$root/modules/"
        basename "$dep" >> "$root/modules/order"
    done
done

# With the fleet: softdog and the watchdog core for the watchdog scenario, which loads them itself
# (with its own parameters), so they are not in modules/order.
if [ -n "${L1_VIM_BINS:-}" ]; then
    mkdir -p "$root/modules/watchdog"
    for dep in $(modprobe -d "$images/modules" -S "$kver" --show-depends softdog | awk '/^insmod/{print $2}'); do
        cp "$dep" "$root/modules/watchdog/"
        basename "$dep" >> "$root/modules/watchdog/order"
    done
fi

# A program and the shared libraries ldd lists for it.
install_bin() { # path-in-host dest-in-root
    install -D -m 0755 "$1" "$root$2"
    for lib in $(ldd "$1" 2>/dev/null | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
install_bin "$vmm" /bin/vmm
if [ -n "${L1_VIM_BINS:-}" ]; then
    for b in vimd vimctl vim-agent; do install_bin "$L1_VIM_BINS/$b" "/bin/$b"; done
    install_bin "$(command -v nats-server)" /bin/nats-server
    rm -f "$root/bin/ip"
    install_bin "$(readlink -f "$(command -v ip)")" /bin/ip
    mkdir -p "$root/var/run/netns" "$root/etc"
    # A host joins the fleet with the one command vimctl prints (`curl … | sh`); the script
    # unpacks fleet-agent.deb with dpkg-deb, which runs GNU tar: Debian's programs, as a real host
    # has them. And the VMM user the package's postinst would have made.
    # Busybox's shell runs its own applets for dpkg-deb and tar whatever PATH says (and its
    # dpkg-deb reads no xz), so the join runs under Debian's shell, found first as `sh` in
    # /opt/debian/bin; and coreutils' install, which this busybox lacks.
    install_bin "$(command -v curl)" /bin/curl
    install_bin "$(command -v dpkg-deb)" /bin/dpkg-deb
    rm -f "$root/bin/tar"
    install_bin "$(readlink -f "$(command -v tar)")" /bin/tar
    install_bin "$(readlink -f "$(command -v dash)")" /bin/dash
    install_bin "$(command -v install)" /bin/install
    mkdir -p "$root/opt/debian/bin"
    ln -sf /bin/dash "$root/opt/debian/bin/sh"
    printf 'root:x:0:0:root:/:/bin/sh\nvim-vmm:x:64000:64000::/nonexistent:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nvim-vmm:x:64000:\n' > "$root/etc/group"
fi

cp "$images/vmlinuz" "$images/initramfs.cpio.gz" "$root/l2/"
# The guest agent binary doubles as the host-side vsock client and echo server.
install -m 0755 "$images/guest-agent" "$root/bin/guest-agent"
# With L1_WITH_QEMU=1 (benchmarks): Debian's QEMU as a second L2 VMM, with its libraries, its TCG
# accelerator module (QEMU loads it even with KVM) and the firmware microvm and q35 need.
if [ "${L1_WITH_QEMU:-0}" = 1 ]; then
    qemu=/usr/bin/qemu-system-x86_64
    install -D -m 0755 "$qemu" "$root/usr/bin/qemu-system-x86_64"
    mod=/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so
    install -D -m 0644 "$mod" "$root$mod"
    for lib in $( (ldd "$qemu"; ldd "$mod") | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    mkdir -p "$root/usr/share/qemu"
    for f in bios-microvm.bin pvh.bin linuxboot_dma.bin kvmvapic.bin; do
        cp -L "/usr/share/qemu/$f" "$root/usr/share/qemu/"
    done
    # SeaBIOS for q35 (the CPU hotplug benchmark), where Debian's QEMU looks for it.
    mkdir -p "$root/usr/share/seabios"
    cp -L /usr/share/seabios/bios-256k.bin "$root/usr/share/seabios/"
fi

cp "$here/l1.sh" "$root/lib/l1.sh"
install -m 0755 "$here/../netns-exec.sh" "$root/bin/netns-exec"
cat > "$root/init" <<'INIT'
#!/bin/sh
. /lib/l1.sh
l1_setup
result base fail "no scenario cpio was appended"
l1_poweroff
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/l1-base.cpio.tmp"
mv "$out/l1-base.cpio.tmp" "$out/l1-base.cpio"
rm -rf "$root"
echo "build-l1: $out/l1-base.cpio ($(du -h "$out/l1-base.cpio" | cut -f1))" >&2
