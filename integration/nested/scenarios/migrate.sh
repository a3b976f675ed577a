#!/bin/sh
# Issue 4 (without virtio devices so far): the Debian guest is snapshotted and restored, then
# live-migrated between two vmm processes in L1 through a shared directory; its counter continues.
. /lib/l1.sh
l1_setup
count() { tr -d '\r' < "$1" | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | tail -n 1; }
first_count() { tr -d '\r' < "$1" | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | head -n 1; }
wait_count() { # file minimum seconds
    i=0
    while [ $i -lt "$3" ]; do
        c=$(count "$1"); [ -n "$c" ] && [ "$c" -ge "$2" ] && return 0
        sleep 1; i=$((i + 1))
    done
    return 1
}
args="--kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --vcpus 2 --memory-mib 512"
cmd="console=ttyS0 panic=-1 guest.scenario=counter"

# Snapshot -> restore in a new process.
vmm run $args --cmdline "$cmd" --serial file:/tmp/a.log --api-socket /tmp/a.sock 2>/tmp/a.err &
a=$!
wait_count /tmp/a.log 5 150 || echo "L1: guest A never counted"
vmm ctl --api-socket /tmp/a.sock pause >/dev/null
last=$(count /tmp/a.log)
vmm ctl --api-socket /tmp/a.sock snapshot --dir /tmp/snap >/dev/null
kill -9 $a; wait $a 2>/dev/null
vmm restore --snapshot /tmp/snap --serial file:/tmp/r.log --api-socket /tmp/r.sock 2>/tmp/r.err &
r=$!
if wait_count /tmp/r.log $((last + 5)) 60 && [ "$(first_count /tmp/r.log)" = $((last + 1)) ]; then
    result snapshot-restore-linux pass "last=$last first_after=$(first_count /tmp/r.log)"
else
    result snapshot-restore-linux fail "last=$last first_after=$(first_count /tmp/r.log) $(cat /tmp/r.err)"
fi
kill -9 $r; wait $r 2>/dev/null

# Live migration with the guest running.
mkdir -p /tmp/shared
vmm run --incoming /tmp/shared --serial file:/tmp/t.log --api-socket /tmp/t.sock 2>/tmp/t.err &
t=$!
vmm run $args --cmdline "$cmd" --serial file:/tmp/s.log --api-socket /tmp/s.sock 2>/tmp/s.err &
s=$!
wait_count /tmp/s.log 5 150 || echo "L1: guest S never counted"
out=$(vmm ctl --api-socket /tmp/s.sock migrate --dir /tmp/shared 2>&1 | tail -n 1)
wait $s
st=$?
last=$(count /tmp/s.log)
if echo "$out" | grep -q '"status":"completed"' && [ "$st" = 0 ] && wait_count /tmp/t.log $((last + 5)) 60 \
    && [ "$(first_count /tmp/t.log)" = $((last + 1)) ]; then
    result migrate-linux pass "$out last_on_source=$last first_on_target=$(first_count /tmp/t.log)"
else
    result migrate-linux fail "$out source_exit=$st last=$last first=$(first_count /tmp/t.log) $(cat /tmp/t.err)"
fi
kill -9 $t; wait $t 2>/dev/null
l1_poweroff
