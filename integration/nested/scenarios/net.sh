#!/bin/sh
# Issue 3: virtio-net. Our vmm creates tap0 in L1; the guest's eth0 and L1 ping each other and move
# a 2 MiB file each way over HTTP, compared by checksum. All traffic stays inside the L1 VM, which
# has no network device of its own.
. /lib/l1.sh
l1_setup
line() { tr -d '\r' < "$L2_LOG" | sed -n "s/.*guest: $1 //p" | head -n 1; }
wait_line() { # pattern seconds
    i=0
    while [ $i -lt "$2" ]; do grep -q "guest: $1" "$L2_LOG" && return 0; sleep 1; i=$((i + 1)); done
    return 1
}
L2_LOG=/tmp/net.log
: > "$L2_LOG"
vmm run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --serial "file:$L2_LOG" \
    --vcpus 1 --memory-mib 512 --net tap=tap0,mac=52:54:00:00:00:02 \
    --cmdline "console=ttyS0 panic=-1 guest.scenario=net" 2> /tmp/net.err &
vmm_pid=$!
i=0
while [ ! -e /sys/class/net/tap0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
ip addr add 10.99.0.1/24 dev tap0
ip link set tap0 up
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/www/h2g bs=1K count=2048 2>/dev/null
h2g=$(sha256sum < /tmp/www/h2g | cut -d' ' -f1)
httpd -p 8081 -h /tmp/www

if wait_line "ping-host" 90; then
    mac=$(line eth0)
    [ "$mac" = "mac=52:54:00:00:00:02" ] && result net-mac pass "$mac" || result net-mac fail "$mac"
    [ "$(line ping-host)" = ok ] && result net-ping-guest-to-host pass "" || result net-ping-guest-to-host fail "$(line ping-host)"
    ping -c 3 -W 5 10.99.0.2 >/dev/null 2>&1 && result net-ping-host-to-guest pass "" || result net-ping-host-to-guest fail ""
    wget -q -O /tmp/g2h http://10.99.0.2:8080/g2h
    got=$(sha256sum < /tmp/g2h | cut -d' ' -f1)
    [ "$got" = "$(line g2h | sed 's/sha=//')" ] && result net-transfer-guest-to-host pass "sha=$got" \
        || result net-transfer-guest-to-host fail "got=$got guest=$(line g2h)"
    wait_line "h2g" 60
    [ "$(line h2g)" = "sha=$h2g" ] && result net-transfer-host-to-guest pass "sha=$h2g" \
        || result net-transfer-host-to-guest fail "sent=$h2g guest=$(line h2g)"
else
    result net-ping-guest-to-host fail "guest never got that far"
    tail -n 30 "$L2_LOG" | sed 's/^/L1:   /'
    sed 's/^/L1: vmm: /' /tmp/net.err
fi
touch /tmp/www/done
i=0
while kill -0 $vmm_pid 2>/dev/null && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
if kill -0 $vmm_pid 2>/dev/null; then
    echo "L1: the guest did not power off; console tail:"
    tail -n 15 "$L2_LOG" | sed 's/^/L1:   /'
    kill -9 $vmm_pid 2>/dev/null
fi
wait $vmm_pid
st=$?
[ "$st" = 0 ] && result net-poweroff pass "" || result net-poweroff fail "vmm_exit=$st"
l1_poweroff
