#!/usr/bin/env bash
# Nested lane, issue 13: a host that loses power. Two L1 VMs (QEMU TCG, run-l1.sh) are the hosts,
# each joining the fleet with the command `vimctl host add --join` prints and then running the
# vim-agent it installed (l1-host.sh; issue 19); vimd with its NATS, and an NFS server (nfs-ganesha, in user
# space) exporting the shared storage, run here and the L1s reach them through QEMU's user network.
# A Debian guest booted from its ext4 root disk (images/out/rootfs.ext4, systemd) appends and
# fsyncs numbered records (images/rootfs/disk-writer) on one host; that host's QEMU is SIGKILLed.
# Then: vimd fences the host once its lease has lapsed and the VM boots on the other host; every
# record the guest had reported synced before the crash is on its disk, the records go on from
# there without a gap, and once the VM is stopped `e2fsck -fn` finds its filesystem clean.
#
# Prints "RESULT <name> pass|fail <detail>" lines and "SCENARIO-DONE" (as the L1 scenarios do).
# Usage: power-loss.sh L1_BASE_CPIO BIN_DIR TIMEOUT_S     (BIN_DIR holds vimd and vimctl)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
base=${1:?usage: power-loss.sh L1_BASE_CPIO BIN_DIR TIMEOUT_S}
bins=${2:?}
limit=${3:?}
images="$repo/images/out"
work=$(mktemp -d /tmp/power-loss.XXXXXX)
export_dir="$work/export"
mkdir -p "$export_dir/conf" "$export_dir/shared" "$work/ganesha"
vimd_pid="" ganesha_pid="" l1_pids=()
say() { echo "power-loss: $*"; }

cleanup() {
    touch "$export_dir/conf/done" 2>/dev/null
    for h in h1 h2; do
        [ -s "$work/qemu-$h.pid" ] && kill -9 "$(cat "$work/qemu-$h.pid")" 2>/dev/null
    done
    for p in "${l1_pids[@]}"; do wait "$p" 2>/dev/null; done
    [ -n "$vimd_pid" ] && kill "$vimd_pid" 2>/dev/null && wait "$vimd_pid" 2>/dev/null
    # vimd's nats-server outlives vimd by design: stopped here by its pid file.
    [ -s "$work/vim/nats/nats.pid" ] && kill "$(cat "$work/vim/nats/nats.pid")" 2>/dev/null
    [ -n "$ganesha_pid" ] && kill "$ganesha_pid" 2>/dev/null && wait "$ganesha_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_for() { # seconds what command...: polls every second
    local n=$1 what=$2
    shift 2
    while [ "$n" -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
        n=$((n - 1))
    done
    say "timed out waiting for $what"
    return 1
}
field() { # json-text key: a string field of vimctl's JSON
    echo "$1" | sed -n 's/.*"'"$2"'": *"\([^"]*\)".*/\1/p' | head -n 1
}
failed=0
result() { # name pass|fail detail
    echo "RESULT $1 $2 $3"
    [ "$2" = pass ] || failed=1
}
names=(pl-joined pl-boot pl-restarted pl-synced-kept pl-writes-go-on pl-fsck pl-events)
fail_all() {
    for r in "${names[@]}"; do echo "RESULT $r fail $1"; done
    show_logs
    echo "SCENARIO-DONE"
    exit 0
}
show_logs() {
    for f in "$work/vimd.log" "$export_dir"/logs/*.log "$work"/console-*.log "$work/ganesha/ganesha.log"; do
        [ -e "$f" ] || continue
        say "$(basename "$f") (last 40 lines):"
        tail -n 40 "$f" | sed 's/^/power-loss:   /'
    done
    [ -n "${log:-}" ] && [ -e "$log" ] && { say "guest console (last 30 lines):"; tail -n 30 "$log" | tr -d '\r' | sed 's/^/power-loss:   /'; }
}

# --- NFS: NFSv4.1 only, on loopback. A client that vanishes loses its state (and so the disk's
# lock its VMM held) after the 10 s lease; no grace period at start (nothing to reclaim).
nfs_port=$(free_port)
cat > "$work/ganesha/ganesha.conf" <<CONF
NFS_CORE_PARAM { Protocols = 4; NFS_Port = $nfs_port; Bind_addr = 127.0.0.1;
    Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; }
NFSv4 { Lease_Lifetime = 10; Graceless = true; RecoveryRoot = "$work/ganesha/recovery"; }
EXPORT { Export_Id = 1; Path = "$export_dir"; Pseudo = "/share"; Access_Type = RW;
    Squash = No_Root_Squash; SecType = sys; Protocols = 4; Transports = TCP; FSAL { Name = VFS; } }
CONF
ganesha.nfsd -F -f "$work/ganesha/ganesha.conf" -L "$work/ganesha/ganesha.log" \
    -p "$work/ganesha/ganesha.pid" -N NIV_EVENT &
ganesha_pid=$!
wait_for 30 "the NFS server" grep -q "NFS SERVER INITIALIZED" "$work/ganesha/ganesha.log" \
    || fail_all "nfs-ganesha did not start"

# --- vimd with its own NATS. TCG L1s are slow: 10 missed one-second heartbeats, a 10 s lease.
api_port=$(free_port)
nats_port=$(free_port)
export VIM_API="https://127.0.0.1:$api_port" VIM_TOKEN_FILE="$work/vim/admin.token" VIM_CA="$work/vim/tls/ca.pem"
PATH="$bins:$PATH"
[ -e "$repo/target/debian/fleet-agent.deb" ] || fail_all "no target/debian/fleet-agent.deb (scripts/package.sh)"
vimd --state-dir "$work/vim" --shared-dir "$export_dir/shared" --listen "127.0.0.1:$api_port" \
    --packages-dir "$repo/target/debian" \
    --nats-listen "127.0.0.1:$nats_port" --nats-advertise "nats://10.0.2.2:$nats_port" \
    --tls-name 10.0.2.2 --heartbeat-ms 1000 --misses 10 --lease-ms 10000 2>"$work/vimd.log" &
vimd_pid=$!
wait_for 60 "vimd" vimctl hosts || fail_all "vimd did not answer"
# Each L1 joins as an operator's new host would: with the one command `host add --join` prints
# (run in L1, it fetches the agent package and the host's credentials from vimd over TLS pinned to
# vimd's key). L1 reaches vimd's API as 10.0.2.2; the shared storage is at the same path there.
for h in h1 h2; do
    vimctl host add "$h" --join --join-url "https://10.0.2.2:$api_port" \
        --shared-dir "$export_dir/shared" > "$work/join-$h.out" 2>&1 \
        || fail_all "host add $h --join failed: $(cat "$work/join-$h.out")"
    files="$work/l1-$h"
    mkdir -p "$files/etc"
    sed -n 's/^ *\(curl .*\)$/\1/p' "$work/join-$h.out" > "$files/etc/join-command"
    [ -s "$files/etc/join-command" ] || fail_all "no join command for $h in: $(cat "$work/join-$h.out")"
    printf 'HOST_ID=%s\nNATS_PORT=%s\nNFS_PORT=%s\nEXPORT=%s\n' "$h" "$nats_port" "$nfs_port" "$export_dir" \
        > "$files/etc/scenario.env"
    L1_FILES_DIR="$files" L1_PID_FILE="$work/qemu-$h.pid" \
        L1_QEMU_ARGS="-netdev user,id=n0 -device virtio-net-pci,netdev=n0" \
        "$here/../run-l1.sh" "$base" "$here/l1-host.sh" "$limit" > "$work/console-$h.log" 2>&1 &
    l1_pids+=($!)
done
both_reachable() { [ "$(vimctl hosts | grep -c ' reachable')" = 2 ]; }
# An L1 that powered off (its join failed) ends the wait at once.
up_or_gone() {
    both_reachable && return 0
    for p in "${l1_pids[@]}"; do kill -0 "$p" 2>/dev/null || return 0; done
    return 1
}
wait_for 600 "both hosts" up_or_gone && both_reachable \
    || fail_all "the L1 hosts did not come up: $(vimctl hosts 2>&1)"
say "fleet up after ${SECONDS}s"
joined=""
for h in h1 h2; do
    grep -q "join: host $h installed under /" "$export_dir/logs/join-$h.log" && joined="$joined $h"
done
if [ "$joined" = " h1 h2" ]; then
    result pl-joined pass "h1 and h2 joined with the printed command and run the agent it installed"
else
    result pl-joined fail "joined:$joined"
fi

# --- the Debian guest, booted from its root disk
vimctl image add deb --kernel "$images/vmlinuz" --initrd "$images/initramfs.cpio.gz" \
    --disk "$images/rootfs.ext4" --cmdline "console=ttyS0 panic=-1 guest.root=/dev/vda" --json >/dev/null \
    || fail_all "image add failed"
id=$(vimctl vm create --name deb --image deb --vcpus 1 --memory-mib 256 2>"$work/create.err")
[ -n "$id" ] || fail_all "vm create: $(cat "$work/create.err")"
show=$(vimctl vm show "$id")
src=$(field "$show" host_id)
disk=$(field "$show" disk_path)
log="$export_dir/shared/vms/$id/console.log"
synced() { tr -d '\r' < "$log" | sed -n 's/.*guest: synced \([0-9]*\).*/\1/p' | tail -n 1; }
starts() { grep -c "guest: writer-start" "$log"; }
synced_at_least() { local n; n=$(synced); [ -n "$n" ] && [ "$n" -ge "$1" ]; }
if wait_for 900 "the guest's records" synced_at_least 20; then
    result pl-boot pass "Debian (systemd) on $src after ${SECONDS}s, writing: synced $(synced)"
else
    fail_all "the guest never wrote on $src"
fi

# --- the power loss
seen=$(synced)
before=$(starts)
kill -9 "$(cat "$work/qemu-$src.pid")"
t0=$SECONDS
say "pulled $src's plug with record $seen reported synced"
restarted() { [ "$(starts)" -gt "$before" ]; }
if ! wait_for 600 "the VM back" restarted; then
    fail_all "the VM did not boot again: $(vimctl vm show "$id" 2>&1 | tr '\n' ' ')"
fi
rto=$((SECONDS - t0))
show=$(vimctl vm show "$id")
dst=$(field "$show" host_id)
if [ -n "$dst" ] && [ "$dst" != "$src" ] && [ "$(field "$show" state)" = running ]; then
    result pl-restarted pass "on $dst, writer running again ${rto}s after the power loss of $src"
else
    result pl-restarted fail "host '$dst' (was $src): $show"
fi
last=$(tr -d '\r' < "$log" | sed -n 's/.*guest: writer-start last=\([0-9]*\).*/\1/p' | tail -n 1)
if [ -n "$last" ] && [ "$last" -ge "$seen" ]; then
    result pl-synced-kept pass "the disk held record $last; $seen had been reported synced"
else
    result pl-synced-kept fail "the disk held record '$last'; $seen had been reported synced"
fi
if wait_for 300 "more records" synced_at_least $((last + 20)); then
    result pl-writes-go-on pass "synced $(synced) on $dst"
else
    result pl-writes-go-on fail "synced '$(synced)' on $dst, from $last"
fi

# --- the disk, once the VM is stopped. The minimal image has no D-Bus, so systemd-logind does not
# take the power button and the stop is forced after its 10 s: a second crash, as far as the
# filesystem knows. A copy of the disk gets its journal replayed (what a mount does), then must
# be clean (`e2fsck -fn`) and hold records 1..K without a gap, K at least the last reported synced.
vimctl vm stop "$id" >/dev/null 2>&1
stopped() { [ "$(field "$(vimctl vm show "$id")" state)" = stopped ]; }
wait_for 300 "the VM stopped" stopped
final=$(synced)
copy="$work/disk-copy.img"
cp --sparse=always "$disk" "$copy"
e2fsck -fp "$copy" >/dev/null 2>&1
fsck=$(e2fsck -fn "$copy" 2>&1)
fsck_rc=$?
records=$(debugfs -R "cat /var/lib/writer/log" "$copy" 2>/dev/null | awk '$2 != NR && !bad {bad = NR} END {print NR, bad + 0}')
if [ $fsck_rc = 0 ] && [ "${records#* }" = 0 ] && [ "${records% *}" -ge "$final" ]; then
    result pl-fsck pass "journal replayed, e2fsck -fn clean; records 1..${records% *} in order (last reported synced: $final)"
else
    result pl-fsck fail "e2fsck -fn rc=$fsck_rc ($(echo "$fsck" | tail -n 3 | tr '\n' ' ')); records (count, first out of order): $records; last reported synced: $final"
fi
events=$(vimctl events 2>&1)
missing=""
for k in Host_Fenced VM_Failover_Started VM_Restarted; do
    echo "$events" | grep -q " $k " || missing="$missing $k"
done
if [ -z "$missing" ]; then
    result pl-events pass "$(echo "$events" | grep -E 'Host_Fenced|VM_Restarted' | tr -s ' ' | tr '\n' ';')"
else
    result pl-events fail "missing:$missing; $(echo "$events" | tail -n 12 | tr -s ' ' | tr '\n' ';')"
fi
[ "$failed" = 1 ] && show_logs
echo "SCENARIO-DONE"
