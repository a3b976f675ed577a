#!/bin/sh
# Issue 12 with the real Debian guest: the VIM live-migrates it between two hosts. Inside one L1:
# vimd with its own NATS, two agents each in a network namespace (reaching NATS over a veth, with
# their own bridge, the two bridges joined by a veth like two hosts on one switch), shared storage
# a directory. The guest (disk and NIC, created through vimctl) writes a counter to its disk five
# times a second while `vimctl vm migrate` moves it. Afterwards: the VM runs on the other host
# (one VMM for it), its counter went on without a gap, it answers ping from both namespaces, new
# disk writes arrive, and once stopped, the 4 MiB it wrote before the move are intact on its disk.
. /lib/l1.sh
l1_setup
count() { tr -d '\r' < "$1" | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | tail -n 1; }
first_after() { # file n: the first count above n
    tr -d '\r' < "$1" | sed -n 's/.*guest: count \([0-9]*\).*/\1/p' | awk -v n="$2" '$1 > n {print; exit}'
}
field() { # json-text key: a string field of vimctl's JSON
    echo "$1" | sed -n 's/.*"'"$2"'": *"\([^"]*\)".*/\1/p' | head -n 1
}
wait_for() { # seconds command...: polls once a second, saying so every 30 s (a silent L1 is a stall)
    n=$1; shift
    while [ "$n" -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        [ $((n % 30)) = 0 ] && echo "L1: waiting for $* ($n s left)"
        sleep 1; n=$((n - 1))
    done
    return 1
}
fail_all() { # why: the fleet never came up; every check fails with the logs
    for r in vim-migrate vim-counter vim-net-h1 vim-net-h2 vim-disk-writes vim-one-vmm vim-disk-intact; do
        result $r fail "$1"
    done
    for f in /tmp/vimd.log /tmp/agent-h1.log /tmp/agent-h2.log; do
        echo "L1: $f:"; tail -n 20 "$f" 2>/dev/null | sed 's/^/L1:   /'
    done
    l1_poweroff
}

# iproute2's ip, by path: busybox's sh runs its own applet for a bare `ip`.
/bin/ip link set lo up
S=/tmp/vim
# JetStream reserves its streams' limits (3.25 GiB) against the store's free space: a tmpfs that
# large (it holds only what is written: a few MiB here, and the 256 MiB guest's migration).
mkdir -p $S
mount -t tmpfs -o size=8g vimstate $S
export VIM_API=https://127.0.0.1:8640 VIM_TOKEN_FILE=$S/admin.token VIM_CA=$S/tls/ca.pem
for h in 1 2; do
    /bin/ip netns add h$h
    /bin/ip link add vr$h type veth peer name vh$h
    /bin/ip link set vh$h netns h$h
    /bin/ip addr add 10.231.$h.1/30 dev vr$h
    /bin/ip link set vr$h up
    /bin/ip -n h$h addr add 10.231.$h.2/30 dev vh$h
    /bin/ip -n h$h link set vh$h up
    /bin/ip -n h$h link set lo up
done
# TCG is slow: ten missed one-second heartbeats before a host is unreachable.
vimd --state-dir $S --listen 127.0.0.1:8640 --nats-listen 0.0.0.0:4222 \
    --nats-advertise nats://10.231.0.1:4222 --tls-name 10.231.1.1 --tls-name 10.231.2.1 \
    --heartbeat-ms 1000 --misses 10 2>/tmp/vimd.log &
wait_for 180 vimctl hosts || fail_all "vimd did not answer"
for h in 1 2; do
    creds=$(field "$(vimctl host add h$h --json)" credentials_file)
    # The L1 has no password database: the VMMs' user by number.
    netns-exec h$h vim-agent --host-id h$h --nats-url nats://10.231.$h.1:4222 --credentials "$creds" \
        --nats-ca $VIM_CA --state-dir /tmp/agent-h$h --shared-dir $S/shared --vmm /bin/vmm \
        --vmm-user 64000:64000 \
        --heartbeat-ms 1000 2>/tmp/agent-h$h.log &
done
both_reachable() { [ "$(vimctl hosts | grep -c ' reachable')" = 2 ]; }
wait_for 180 both_reachable || fail_all "the agents did not come up: $(vimctl hosts 2>&1)"
echo "L1: fleet up after $(cut -d' ' -f1 /proc/uptime)s"
# Each agent made its bridge (vimbr0); join them, and give each host an address on it.
/bin/ip link add xb1 type veth peer name xb2 netns h2
/bin/ip link set xb1 netns h1
/bin/ip -n h1 link set xb1 master vimbr0 up
/bin/ip -n h2 link set xb2 master vimbr0 up
/bin/ip -n h1 addr add 10.99.0.1/24 dev vimbr0
/bin/ip -n h2 addr add 10.99.0.3/24 dev vimbr0

dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
vimctl image add deb --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --disk /tmp/disk.img \
    --cmdline "console=ttyS0 panic=-1 guest.scenario=counter" --json >/dev/null
id=$(vimctl vm create --name deb --image deb --vcpus 1 --memory-mib 256 2>/tmp/create.err)
[ -n "$id" ] || fail_all "vm create: $(cat /tmp/create.err)"
show=$(vimctl vm show "$id")
src=$(field "$show" host_id)
disk=$(field "$show" disk_path)
log=$S/shared/vms/$id/console.log
pattern_written() { grep -qs "guest: pattern-written" "$log"; }
counting() { c=$(count "$log"); [ -n "$c" ] && [ "$c" -ge 5 ]; }
wait_for 200 pattern_written && wait_for 60 counting || fail_all "the guest never counted: $(tail -n 5 "$log")"
pattern=$(guest-agent checksum "$disk" 4194304)
echo "L1: guest on $src counting; disk pattern $pattern; $(free -m | awk '/^Mem/ {print "L1 memory used " $3 " MiB"}')"

# The move, while the guest writes to its disk.
last=$(count "$log")
t0=$(cut -d' ' -f1 /proc/uptime)
out=$(timeout 600 vimctl vm migrate "$id" 2>&1)
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
show=$(vimctl vm show "$id")
dst=$(field "$show" host_id)
if [ $rc = 0 ] && [ -n "$dst" ] && [ "$dst" != "$src" ] && [ "$(field "$show" state)" = running ]; then
    result vim-migrate pass "$src -> $dst in $(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}') s: $(echo "$out" | tr '\r' '\n' | tail -n 1)"
else
    result vim-migrate fail "rc=$rc $src -> '$dst': $out; $(vimctl jobs 2>&1 | tail -n 3)"
fi
more() { c=$(count "$log"); [ -n "$c" ] && [ "$c" -ge $((last + 10)) ]; }
wait_for 60 more
next=$(first_after "$log" "$last")
if [ "$next" = $((last + 1)) ] && more; then
    result vim-counter pass "last=$last next=$next now=$(count "$log")"
else
    result vim-counter fail "last=$last next=$next now=$(count "$log")"
fi
for h in 1 2; do
    ans=$(/bin/ip netns exec h$h ping -c 3 -W 5 10.99.0.2 2>&1)
    [ $? = 0 ] && result vim-net-h$h pass "$(echo "$ans" | tail -n 1)" || result vim-net-h$h fail "$ans"
done
sleep 2
on_disk=$(dd if="$disk" bs=512 skip=16384 count=1 2>/dev/null | tr -d '\000' | sed -n 's/count \([0-9]*\).*/\1/p')
[ -n "$on_disk" ] && [ "$on_disk" -gt "$last" ] && result vim-disk-writes pass "on disk: $on_disk > $last" \
    || result vim-disk-writes fail "on disk: '$on_disk', last before the move $last"
vmms=$(ps -o args | grep -c "^/bin/vmm run.*$id")
[ "$vmms" = 1 ] && result vim-one-vmm pass "one VMM runs VM $id" \
    || result vim-one-vmm fail "$vmms VMMs for VM $id: $(ps -o pid,args | grep "[v]mm run")"
# Jailed (docs/sandbox.md): the VMM user, no capabilities, the VM's cgroup v2 with its limits.
pid=$(ps -o pid,args | grep "[/]bin/vmm run.*$id" | awk '{print $1}' | head -n 1)
status=$(cat /proc/$pid/status 2>/dev/null)
uid=$(echo "$status" | awk '/^Uid:/ {print $2 $3 $4 $5}')
capeff=$(echo "$status" | awk '/^CapEff:/ {print $2}')
cg=$(cat /proc/$pid/cgroup 2>/dev/null)
cpu=$(cat /sys/fs/cgroup/vim-vms/$dst/$id/cpu.max 2>/dev/null)
mem=$(cat /sys/fs/cgroup/vim-vms/$dst/$id/memory.max 2>/dev/null)
if [ "$uid" = 64000640006400064000 ] && [ "$capeff" = 0000000000000000 ] \
    && [ "$cg" = "0::/vim-vms/$dst/$id" ] && [ "$cpu" = "100000 100000" ] && [ "$mem" = 402653184 ]; then
    result vim-jail pass "VMM $pid: uid 64000, no capabilities, cgroup $cg: cpu.max $cpu, memory.max $mem"
else
    result vim-jail fail "VMM '$pid': uid '$uid' CapEff '$capeff' cgroup '$cg' cpu.max '$cpu' memory.max '$mem'"
fi
vimctl vm stop "$id" >/dev/null 2>&1
after=$(guest-agent checksum "$disk" 4194304)
[ "$after" = "$pattern" ] && result vim-disk-intact pass "fnv64 $after" \
    || result vim-disk-intact fail "before the move $pattern, after $after"
l1_poweroff
