#!/bin/sh
# Issue 3: every virtio device with the real Linux drivers, in one L2 boot; a second boot reads the
# disk back.
. /lib/l1.sh
l1_setup
dd if=/dev/zero of=/tmp/disk.img bs=1M count=0 seek=64 2>/dev/null
dd if=/dev/zero of=/tmp/ro.img bs=1M count=0 seek=16 2>/dev/null
base="console=ttyS0 panic=-1"
l2_boot devices 150 --vcpus 1 --memory-mib 512 --disk /tmp/disk.img --disk /tmp/ro.img,ro --rng \
    --cmdline "$base guest.scenario=devices"
line() { tr -d '\r' < "$L2_LOG" | sed -n "s/.*guest: $1 //p" | head -n 1; }
[ "$L2_STATUS" = 0 ] && grep -q "guest: ready" "$L2_LOG" && result devices-boot pass "" || result devices-boot fail "vmm_exit=$L2_STATUS"
size=$(line vda)
[ "$size" = "size_bytes=67108864" ] && result blk-size pass "$size" || result blk-size fail "$size"
ro=$(line ro-write)
vdb=$(line vdb)
[ "$ro" = refused ] && [ "$vdb" = "ro=1" ] && result blk-readonly pass "$vdb" || result blk-readonly fail "ro-write=$ro $vdb"
rng=$(line rng)
case "$rng" in "current=virtio_rng"*" bytes=64") result rng pass "$rng" ;; *) result rng fail "$rng" ;; esac
written=$(line blk-written)
l2_boot blk-read 150 --vcpus 1 --memory-mib 512 --disk /tmp/disk.img --cmdline "$base guest.scenario=blk-read"
read=$(line blk-read)
[ -n "$written" ] && [ "$read" = "$written" ] && result blk-persist pass "$read" || result blk-persist fail "written=$written read=$read"
l1_poweroff
