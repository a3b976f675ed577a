#!/bin/sh
# Issue 4 with the real Debian guest and every device: a disk on the shared directory, a tap, vsock
# (the guest agent), rng and a balloon.
#   1. snapshot -> restore --paused -> snapshot again: device state and memory equal; resume;
#   2. live migration to a target that died: the source takes the guest and its devices back;
#   3. live migration of the restored VM to a second vmm process.
# After each move: the counter continues with no gap, the 4 MiB written before is intact as the
# guest reads it, new disk writes arrive, L1 pings the guest and the vsock agent answers.
. /lib/l1.sh
l1_setup
count() { tr -d '\r' < "$1" | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | tail -n 1; }
first_after() { # file n: the first count above n (a restored guest repeats nothing before it)
    tr -d '\r' < "$1" | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | awk -v n="$2" '$1 > n {print; exit}'
}
wait_count() { # file minimum seconds
    i=0
    while [ $i -lt "$3" ]; do
        c=$(count "$1"); [ -n "$c" ] && [ "$c" -ge "$2" ] && return 0
        sleep 1; i=$((i + 1))
    done
    return 1
}
S=/tmp/shared
mkdir -p $S
dd if=/dev/zero of=$S/disk.img bs=1M count=16 2>/dev/null
# A persistent tap: it outlives the VMM that closes it at a handover.
tunctl -t tap0 >/dev/null
ip addr add 10.99.0.1/24 dev tap0
ip link set tap0 up
V=/tmp/v.sock
args="--kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --vcpus 2 --memory-mib 512 \
  --disk $S/disk.img --net tap=tap0,mac=52:54:00:00:00:02 --vsock cid=3,socket=$V --rng --balloon"
cmd="console=ttyS0 panic=-1 guest.scenario=counter"

# The guest after a move: NAME BEFORE LOG LAST (the console log before the move, the one after,
# and the last count before the move). The counter is read from both logs joined: a line the
# guest was half-way through sending when it paused ends in the new log (the UART moves one
# byte per exit), so neither log alone holds it whole.
check_moved() {
    what=$1; before=$2; log=$3; last=$4
    seen=/tmp/$what.seen
    wait_count "$log" $((last + 5)) 60
    if [ "$before" = "$log" ]; then cp "$log" $seen; else cat "$before" "$log" > $seen; fi
    now=$(count "$log")
    cut=""
    [ "$before" != "$log" ] && [ -n "$(tail -c 1 "$before")" ] && cut=" (a line was cut by the move: $(tail -c 12 "$before" | tr -d '\r'))"
    if [ "$(first_after $seen "$last")" = $((last + 1)) ] && [ "${now:-0}" -ge $((last + 5)) ]; then
        result $what-counter pass "last=$last next=$(first_after $seen "$last")$cut"
    else
        result $what-counter fail "last=$last next=$(first_after $seen "$last") now=$now"
    fi
    ans=$(guest-agent call $V 52 checksum /dev/vda 4194304 2>&1)
    echo "$ans" | grep -q "\"fnv64\":\"$pattern\"" && result $what-disk-intact pass "$ans" \
        || result $what-disk-intact fail "want $pattern: $ans"
    sleep 2
    on_disk=$(dd if=$S/disk.img bs=512 skip=16384 count=1 2>/dev/null | tr -d '\000' | sed -n 's/count \([0-9]*\).*/\1/p')
    [ -n "$on_disk" ] && [ "$on_disk" -gt "$last" ] && result $what-disk-writes pass "on disk: $on_disk > $last" \
        || result $what-disk-writes fail "on disk: '$on_disk', last before the move $last"
    ans=$(ping -c 2 -W 5 10.99.0.2 2>&1)
    [ $? = 0 ] && result $what-net pass "$(echo "$ans" | tail -n 1)" || result $what-net fail "$ans"
}

# 1. Snapshot, restore paused, snapshot again, resume.
vmm run $args --cmdline "$cmd" --serial file:/tmp/a.log --api-socket /tmp/a.sock 2>/tmp/a.err &
a=$!
i=0
while ! grep -qs "guest: pattern-written" /tmp/a.log && [ $i -lt 150 ]; do sleep 1; i=$((i + 1)); done
wait_count /tmp/a.log 5 60 || echo "L1: guest A never counted"
pattern=$(guest-agent checksum $S/disk.img 4194304)
r=$(guest-agent call $V 52 ping 2>&1)
echo "L1: before the snapshot: pattern $pattern, agent $r"
vmm ctl --api-socket /tmp/a.sock pause >/dev/null
last=$(count /tmp/a.log)
vmm ctl --api-socket /tmp/a.sock snapshot --dir /tmp/snap1 >/dev/null || result snapshot-devices fail "$(cat /tmp/a.err)"
kill -9 $a; wait $a 2>/dev/null
vmm restore --snapshot /tmp/snap1 --paused --serial file:/tmp/r.log --api-socket /tmp/r.sock 2>/tmp/r.err &
rpid=$!
i=0
while [ ! -S /tmp/r.sock ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
vmm ctl --api-socket /tmp/r.sock snapshot --dir /tmp/snap2 >/dev/null
d1=$(vmm inspect --snapshot /tmp/snap1 --part devices)
d2=$(vmm inspect --snapshot /tmp/snap2 --part devices)
# Memory equal apart from what KVM itself writes into guest pages when the vCPUs are loaded:
# kvmclock's time info and steal time, one page each per vCPU at most.
pages=$(cmp -l /tmp/snap1/memory.bin /tmp/snap2/memory.bin | awk '{print int(($1 - 1) / 4096)}' | uniq | sort -u)
npages=$(echo "$pages" | grep -c .)
if [ -n "$d1" ] && [ "$d1" = "$d2" ] && [ "$npages" -le 4 ] \
    && echo "$d1" | grep -q '"device_type":2' && echo "$d1" | grep -q '"next_used":[1-9]'; then
    result snapshot-restore-snapshot-equal pass "devices equal; memory equal but $npages page(s): $(echo $pages)"
else
    result snapshot-restore-snapshot-equal fail "memory pages differing: $npages ($(echo $pages | cut -c1-200)); devices1=$d1 devices2=$d2 $(cat /tmp/r.err)"
fi
vmm ctl --api-socket /tmp/r.sock resume >/dev/null
check_moved restore /tmp/a.log /tmp/r.log "$last"

# 2. Migration to a dead target: the source takes everything back.
mkdir -p $S/dead
out=$(timeout 300 vmm ctl --api-socket /tmp/r.sock migrate --dir $S/dead --timeout-ms 2000 2>&1 | tail -n 1)
last=$(count /tmp/r.log)
if echo "$out" | grep -q '"status":"failed"' && kill -0 $rpid 2>/dev/null; then
    result migrate-dead-target pass "$out"
else
    result migrate-dead-target fail "$out $(cat /tmp/r.err)"
fi
check_moved takeback /tmp/r.log /tmp/r.log "$last"

# 3. Live migration of the restored VM.
echo "L1: before the migration: $(free -m | awk '/^Mem/ {print "memory used " $3 " MiB, free " $4 " MiB"}'), /tmp $(du -sm /tmp | cut -f1) MiB"
vmm run --incoming $S/mig --serial file:/tmp/t.log --api-socket /tmp/t.sock 2>/tmp/t.err &
t=$!
out=$(timeout 300 vmm ctl --api-socket /tmp/r.sock migrate --dir $S/mig 2>&1 | tail -n 1)
# A source that failed to hand over keeps running: bound the wait (killed after 60 s).
( sleep 60; kill -9 $rpid 2>/dev/null ) &
watchdog=$!
wait $rpid
st=$?
kill $watchdog 2>/dev/null
last=$(count /tmp/r.log)
if echo "$out" | grep -q '"status":"completed"' && [ "$st" = 0 ]; then
    result migrate-devices pass "$out"
else
    result migrate-devices fail "$out source_exit=$st; source: $(tail -c 2000 /tmp/r.err); target: $(tail -c 2000 /tmp/t.err); $(ls $S/mig)"
fi
check_moved migrate /tmp/r.log /tmp/t.log "$last"
vmm ctl --api-socket /tmp/t.sock balloon-set 64 >/dev/null
i=0
until vmm ctl --api-socket /tmp/t.sock balloon-stats 2>&1 | grep -q '"actual_mib": *6[4-9]' || [ $i -ge 30 ]; do
    sleep 1; i=$((i + 1))
done
b=$(vmm ctl --api-socket /tmp/t.sock balloon-stats 2>&1 | tr -d '\n ')
echo "$b" | grep -q '"actual_mib":6[4-9]' && result migrate-balloon pass "$b" || result migrate-balloon fail "$b"

# 4. Checkpoints (docs/checkpoint.md) of the migrated VM, every second while it counts and
# writes, followed by a standby VMM (docs/standby.md); then the VM's VMM is SIGKILLed (a host
# crash) and the standby is promoted: the VM goes on from the newest checkpoint.
vmm restore --checkpoint $S/ckpt --standby --serial file:/tmp/c.log --api-socket /tmp/c.sock 2>/tmp/c.err &
c=$!
ok=0; outs=""
for n in 1 2 3 4; do
    o=$(vmm ctl --api-socket /tmp/t.sock checkpoint --dir $S/ckpt 2>&1 | tr -d '\n ')
    echo "$o" | grep -q '"seq":' && ok=$((ok + 1))
    outs="$outs $o"
    sleep 1
done
if [ $ok = 4 ] && echo "$outs" | grep -q '"full":false'; then
    result checkpoint-taken pass "$(echo "$outs" | grep -o '"pause_ms":[0-9.]*' | tr '\n' ' ')"
else
    result checkpoint-taken fail "$outs"
fi
wait_count /tmp/t.log $(( $(count /tmp/t.log) + 5 )) 30
newest=$(ls -d $S/ckpt/ckpt-* | sort | tail -n 1)
seq=$((10#${newest##*ckpt-}))
i=0
until vmm ctl --api-socket /tmp/c.sock info 2>&1 | tr -d '\n ' | grep -q "\"standby_seq\":$seq[,}]" || [ $i -ge 60 ]; do
    sleep 1; i=$((i + 1))
done
sb=$(vmm ctl --api-socket /tmp/c.sock info 2>&1 | tr -d '\n ' | grep -o '"state":"[a-z]*"\|"standby_seq":[0-9]*' | tr '\n' ' ')
echo "$sb" | grep -q "\"standby_seq\":$seq\b" && result standby-follows pass "$sb (newest checkpoint $seq)" \
    || result standby-follows fail "$sb; newest checkpoint $seq; $(tail -c 1500 /tmp/c.err)"
kill -9 $t; wait $t 2>/dev/null
last=$(count /tmp/t.log)
# The count on the checkpoint's disk copy: what the guest had written at that instant.
ck_disk=$(dd if=$newest/disk-0.img bs=512 skip=16384 count=1 2>/dev/null | tr -d '\000' | sed -n 's/count \([0-9]*\).*/\1/p')
p=$(timeout 120 vmm ctl --api-socket /tmp/c.sock promote 2>&1 | tr -d '\n ')
echo "$p" | grep -q '"warm":true' && result standby-promoted pass "$p" \
    || result standby-promoted fail "$p; $(tail -c 1500 /tmp/c.err)"
wait_count /tmp/c.log 1 60
first=$(tr -d '\r' < /tmp/c.log | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | head -n 1)
chosen=$(grep -o 'resuming checkpoint .*' /tmp/c.err)
# Not a boot (that counts from 1 and writes the pattern again), and back in time: from the
# checkpoint's count, which the guest had when the checkpoint paused it.
if [ -n "$first" ] && [ "$first" -gt 1 ] && [ "$first" -le "$last" ] && ! grep -q pattern-written /tmp/c.log; then
    result checkpoint-resumed pass "last count before the crash $last; resumed at $first; $chosen"
else
    result checkpoint-resumed fail "last $last, first after '$first'; $chosen; $(tail -c 1500 /tmp/c.err)"
fi
# Memory and disk from one instant: the disk copy holds the count before the one the guest
# prints first (or that one, when the pause fell between its write and its next count).
if [ -n "$ck_disk" ] && [ -n "$first" ] && { [ "$ck_disk" = $((first - 1)) ] || [ "$ck_disk" = $((first - 2)) ]; }; then
    result checkpoint-disk-instant pass "disk copy: count $ck_disk; memory went on at $first"
else
    result checkpoint-disk-instant fail "disk copy: count '$ck_disk'; memory went on at '$first' (last before the crash $last)"
fi
ans=$(guest-agent call $V 52 checksum /dev/vda 4194304 2>&1)
echo "$ans" | grep -q "\"fnv64\":\"$pattern\"" && result checkpoint-disk-intact pass "$ans" \
    || result checkpoint-disk-intact fail "want $pattern: $ans"
wait_count /tmp/c.log $((first + 10)) 60
gaps=$(tr -d '\r' < /tmp/c.log | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | awk 'NR > 1 && $1 != p + 1 {bad++} {p = $1} END {print bad + 0}')
sleep 2
on_disk=$(dd if=$S/disk.img bs=512 skip=16384 count=1 2>/dev/null | tr -d '\000' | sed -n 's/count \([0-9]*\).*/\1/p')
if [ "$gaps" = 0 ] && [ -n "$on_disk" ] && [ "$on_disk" -ge $((first + 10)) ]; then
    result checkpoint-goes-on pass "counting on without a gap; on disk: $on_disk"
else
    result checkpoint-goes-on fail "gaps $gaps; on disk '$on_disk' (resumed at $first)"
fi
kill -9 $c; wait $c 2>/dev/null
l1_poweroff
