#!/bin/sh
# Issue 14 with the unmodified Debian guest: vCPU hotplug through ACPI, memory through virtio-mem.
#   1. boot with 1 vCPU (4 possible) and 512 MiB (2048 possible); `vmm ctl resize --vcpus 4`:
#      the guest sees 4 CPUs online;
#   2. resize to 2: the guest offlines and ejects two, and its count drops to 2;
#   3. resize to 1536 MiB: MemTotal grows by 1 GiB; back to 512: it shrinks by as much; then to
#      1024 MiB for what follows;
#   4. snapshot and restore: the restored VM has 2 vCPUs and 1024 MiB, and grows to 3 vCPUs;
#   5. live migration to a second vmm: the target has 3 vCPUs and 1024 MiB, shrinks to 1 vCPU
#      and to 512 MiB.
# The guest (guest.scenario=hotplug) brings every added CPU online, as a udev rule would, and
# prints its online count and MemTotal on each change. Each step reports the resize's took_ms
# (the VMM's answer: the guest's ACPI scan acknowledged the change or the eject is done; the
# driver plugged or unplugged every block) and how long until the guest's count or MemTotal
# changed, as L1 sees it (10 ms resolution).
. /lib/l1.sh
l1_setup
L=/tmp/hp.log
nproc_now() { tr -d '\r' < "$1" | sed -n 's/.*guest: nproc \([0-9]*\).*/\1/p' | tail -n 1; }
memtotal_now() { tr -d '\r' < "$1" | sed -n 's/.*guest: nproc [0-9]* memtotal_kb=\([0-9]*\).*/\1/p' | tail -n 1; }
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
wait_nproc() { # log n seconds
    i=0
    while [ $i -lt $(($3 * 10)) ]; do
        [ "$(nproc_now "$1")" = "$2" ] && return 0
        sleep 0.1; i=$((i + 1))
    done
    return 1
}
# step NAME API LOG N: resize to N, then wait for the guest to count N.
step() {
    t0=$(ms)
    out=$(vmm ctl --api-socket "$2" resize --vcpus "$4" 2>&1)
    took=$(echo "$out" | sed -n 's/.*"took_ms": \([0-9.]*\).*/\1/p')
    if wait_nproc "$3" "$4" 120; then
        result "$1" pass "vcpus=$4 took_ms=$took guest_saw_after_ms=$(($(ms) - t0)) info_vcpus=$(vmm ctl --api-socket "$2" info | sed -n 's/^  "vcpus": \([0-9]*\).*/\1/p')"
    else
        result "$1" fail "the guest counts $(nproc_now "$3"), not $4: $out"
        tail -n 20 "$3" | sed 's/^/L1:   /'
    fi
}
# step_mem NAME API LOG MIB: resize to MIB (the VMM waits up to 100 s for the guest), then wait
# for MemTotal to be the boot MemTotal plus what was added to 512 MiB (within 1 %: the kernel's
# own accounting), 110 s at most by L1's clock.
step_mem() {
    want=$((base_kb + ($4 - 512) * 1024))
    t0=$(ms)
    out=$(vmm ctl --api-socket "$2" resize --memory-mib "$4" --timeout-ms 100000 2>&1)
    took=$(echo "$out" | sed -n 's/.*"took_ms": \([0-9.]*\).*/\1/p')
    seen=no
    while [ $(($(ms) - t0)) -lt 110000 ]; do
        m=$(memtotal_now "$3")
        d=$((m - want)); [ $d -lt 0 ] && d=$((-d))
        if [ -n "$m" ] && [ $d -le $((want / 100)) ]; then seen=yes; break; fi
        sleep 0.1
    done
    info=$(vmm ctl --api-socket "$2" info | sed -n 's/^  "memory_mib": \([0-9]*\).*/\1/p')
    if [ $seen = yes ] && [ "$info" = "$4" ]; then
        result "$1" pass "memory_mib=$4 took_ms=$took guest_saw_after_ms=$(($(ms) - t0)) memtotal_kb=$m (boot $base_kb) info_memory_mib=$info"
    else
        result "$1" fail "MemTotal $m kB, wanted about $want; info says $info MiB: $out"
        tail -n 20 "$3" | sed 's/^/L1:   /'
        tail -n 5 /tmp/*.err | sed 's/^/L1:   /'
    fi
}
args="--kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --vcpus 1 --max-vcpus 4 --memory-mib 512 --max-memory-mib 2048"
vmm run $args --cmdline "console=ttyS0 panic=-1 memhp_default_state=online_movable guest.scenario=hotplug" --serial file:$L \
    --api-socket /tmp/a.sock 2>/tmp/a.err &
a=$!
if ! wait_nproc $L 1 200; then
    result hp-boot fail "no guest count: $(tail -n 5 $L 2>/dev/null | tr -d '\r') vmm: $(tail -n 5 /tmp/a.err)"
    l1_poweroff
fi
result hp-boot pass "$(tr -d '\r' < $L | grep 'guest: ready')"
base_kb=$(memtotal_now $L)
step hp-add /tmp/a.sock $L 4
step hp-remove /tmp/a.sock $L 2
step_mem mem-add /tmp/a.sock $L 1536
step_mem mem-remove /tmp/a.sock $L 512
step_mem mem-add-again /tmp/a.sock $L 1024

# Snapshot and restore.
vmm ctl --api-socket /tmp/a.sock pause >/dev/null
vmm ctl --api-socket /tmp/a.sock snapshot --dir /tmp/snap >/dev/null || result hp-restore fail "snapshot: $(tail -n 3 /tmp/a.err)"
kill -9 $a; wait $a 2>/dev/null
R=/tmp/r.log
vmm restore --snapshot /tmp/snap --serial file:$R --api-socket /tmp/r.sock 2>/tmp/r.err &
r=$!
i=0
while [ ! -S /tmp/r.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
v=$(vmm ctl --api-socket /tmp/r.sock info | sed -n 's/^  "vcpus": \([0-9]*\).*/\1/p')
mib=$(vmm ctl --api-socket /tmp/r.sock info | sed -n 's/^  "memory_mib": \([0-9]*\).*/\1/p')
[ "$v" = 2 ] && [ "$mib" = 1024 ] && result hp-restored-size pass "vcpus=$v memory_mib=$mib" || result hp-restored-size fail "vcpus=$v memory_mib=$mib: $(tail -n 3 /tmp/r.err)"
step hp-restore-add /tmp/r.sock $R 3

# Live migration to a second vmm.
mkdir -p /tmp/mig
T=/tmp/t.log
vmm run --incoming /tmp/mig --serial file:$T --api-socket /tmp/t.sock 2>/tmp/t.err &
t=$!
out=$(vmm ctl --api-socket /tmp/r.sock migrate --dir /tmp/mig 2>&1)
echo "$out" | grep -q '"completed"' || result hp-migrated-size fail "migration: $out"
wait $r 2>/dev/null
i=0
while ! vmm ctl --api-socket /tmp/t.sock info >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
v=$(vmm ctl --api-socket /tmp/t.sock info | sed -n 's/^  "vcpus": \([0-9]*\).*/\1/p')
mib=$(vmm ctl --api-socket /tmp/t.sock info | sed -n 's/^  "memory_mib": \([0-9]*\).*/\1/p')
[ "$v" = 3 ] && [ "$mib" = 1024 ] && result hp-migrated-size pass "vcpus=$v memory_mib=$mib" || result hp-migrated-size fail "vcpus=$v memory_mib=$mib"
step hp-migrated-remove /tmp/t.sock $T 1
step_mem mem-migrated-remove /tmp/t.sock $T 512
kill -9 $t 2>/dev/null
l1_poweroff
