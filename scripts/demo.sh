#!/usr/bin/env bash
# The main job: a local fleet on embedded defaults. vimd starts its own nats-server (JetStream) and
# SQLite database under a state directory; one vim-agent registers this machine as host "local";
# vimctl adds the test guest as an image and creates a VM, which the agent boots as a real KVM
# guest under our vmm; its console is shown, then the VM is stopped and deleted and everything this
# script started is stopped (by pid). Its state directory under /tmp goes too, unless DEMO_KEEP=1
# (or the demo failed: then it stays, for the logs in it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vim -p vim-agent
vmm=$(scripts/build-vmm.sh)
images/build.sh
B=$PWD/target/release
state=$(mktemp -d /tmp/fleet-demo.XXXXXX)
pids=()
# The agent puts VMs' taps on this bridge, creating it if missing; removed at the end if it did.
bridge=vimdemo0
made_bridge=
[ -e /sys/class/net/$bridge ] || made_bridge=1
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # vimd's nats-server outlives vimd (the hosts' leases depend on it): stopped by its pid file.
    kill "$(cat "$state/vim/nats/nats.pid" 2>/dev/null)" 2>/dev/null || true
    if [ -n "$made_bridge" ]; then ip link del "$bridge" 2>/dev/null || true; fi
    if [ "$1" = 0 ] && [ "${DEMO_KEEP:-0}" != 1 ]; then
        rm -rf "$state"
    else
        echo "demo: state and logs kept in $state" >&2
    fi
}
trap 'cleanup $?' EXIT
# HTTPS with vimd's own CA (made at its first start); NATS speaks TLS with the same CA.
export VIM_API=https://127.0.0.1:18640 VIM_TOKEN_FILE=$state/vim/admin.token VIM_CA=$state/vim/tls/ca.pem
echo "--- vimd (state in $state/vim, NATS on 127.0.0.1:14222) ---"
$B/vimd --state-dir "$state/vim" --listen 127.0.0.1:18640 --nats-listen 127.0.0.1:14222 \
    --heartbeat-ms 1000 2>"$state/vimd.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$state/vim/admin.token" ] && $B/vimctl hosts >/dev/null 2>&1 && break; sleep 0.1; done
creds=$($B/vimctl host add local --json | sed -n 's/.*"credentials_file": *"\([^"]*\)".*/\1/p')
$B/vim-agent --host-id local --nats-url nats://127.0.0.1:14222 --credentials "$creds" --nats-ca "$VIM_CA" \
    --state-dir "$state/agent" --shared-dir "$state/vim/shared" --vmm "$vmm" --heartbeat-ms 1000 \
    --bridge $bridge 2>"$state/agent.log" &
pids+=($!)
for _ in $(seq 100); do $B/vimctl hosts | grep -q reachable && break; sleep 0.1; done
$B/vimctl hosts
$B/vimctl image add testguest --kernel images/out/testguest.elf --cmdline "tg.mode=smp tg.then=hold tg.hb_ms=500"
echo "--- vimctl vm create ---"
id=$($B/vimctl vm create --name demo --image testguest --vcpus 2 --memory-mib 256)
$B/vimctl vm list
sleep 2
echo "--- vimctl vm console $id ---"
$B/vimctl vm console "$id"
echo "--- stop, delete ---"
$B/vimctl vm stop "$id" >/dev/null
$B/vimctl vm delete "$id"
$B/vimctl events
