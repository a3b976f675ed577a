#!/usr/bin/env bash
# Runs one nested-lane scenario: appends the scenario's /init as a second cpio to the L1 base image
# and boots L1 under QEMU TCG (-cpu max: emulated SVM + NPT). The L1 console is printed on stdout
# when L1 ends; result lines look like "RESULT <name> pass|fail <detail>".
#
# L1 runs with a periodic tick (nohz=off highres=off), because of a lost-wakeup in Debian's QEMU
# 7.2 TCG that froze L1 whole (seen in CI in several scenarios): L1's one-shot LAPIC timer fired,
# its vector (236) sat in the APIC's IRR, and the vCPU never took it (`info lapic`: IRR 236,
# current count 0; the vCPU either halted in L1's idle loop with QEMU at 0 % CPU, or running an
# L2 vCPU that spun waiting for its sibling, which only L1's scheduler, driven by that very tick,
# could run). TCG re-checks a pending interrupt only when something kicks the vCPU out of its
# chained translation blocks (upstream fixed one such window after STI in QEMU 8.2). A one-shot
# timer never fires again until its interrupt is handled; a periodic one keeps firing, and every
# expiry kicks the vCPU, which then takes the interrupt it had left pending.
#
# An L1 whose console stays silent for STALL_S seconds (every wait inside a scenario is shorter)
# has frozen as a whole anyway: then QEMU's CPU use, L1's registers and its local APIC are
# printed, its console is printed with "stalled: " before each line (so none of its RESULT lines
# count), and the run fails. There is no second attempt: a freeze is a bug to find, not to retry.
#
# Usage: run-l1.sh L1_BASE_CPIO SCENARIO_SCRIPT TIMEOUT_S
# For scenarios run from a host-side driver (power-loss.sh): L1_FILES_DIR, a directory whose files
# go into the scenario cpio too (say /etc/scenario.env); L1_QEMU_ARGS, more QEMU arguments (a
# network device); L1_PID_FILE, where QEMU's pid is written (the driver pulls L1's plug).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base=${1:?usage: run-l1.sh L1_BASE_CPIO SCENARIO_SCRIPT TIMEOUT_S}
scenario=${2:?}
limit=${3:?}
stall=${STALL_S:-200}
work=$(mktemp -d)
qemu=""
cleanup() {
    [ -n "$qemu" ] && kill -9 "$qemu" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/root"
[ -n "${L1_FILES_DIR:-}" ] && cp -a "$L1_FILES_DIR/." "$work/root/"
install -m 0755 "$scenario" "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) > "$work/scenario.cpio"
cat "$base" "$work/scenario.cpio" > "$work/l1.cpio"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# What a frozen L1 is doing: QEMU's CPU use over 5 s and L1's registers from QEMU's monitor.
stall_report() { # qemu_pid monitor_socket
    local t0 t1
    t0=$(cpu_ticks "$1")
    sleep 5
    t1=$(cpu_ticks "$1")
    echo "run-l1: L1 console silent for ${stall}s: L1 stalled; QEMU used $((t1 - t0)) ticks of CPU in 5 s"
    python3 - "$2" <<'EOF' 2>&1 | sed 's/^/run-l1:   /'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
def read():
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except socket.timeout:
        pass
    return out.decode(errors="replace")
read()
# Registers (where it is), the local APIC (is its timer armed, is an interrupt stuck in IRR) and
# the legacy PIC. The monitor echoes each command with terminal escapes: keep the answer lines.
for cmd in (b"info registers", b"info lapic", b"info pic"):
    s.sendall(cmd + b"\n")
    print("\n".join(l for l in read().splitlines() if "\x1b" not in l and l.strip() != "(qemu)"))
EOF
}

# The L1 run. Status: QEMU's, 124 past the time limit, 125 if L1 stalled.
boot_l1() {
    local log="$work/console.$1" mon="$work/monitor.$1" start=$SECONDS size last=-1 changed=$SECONDS
    : > "$log"
    # Keep L1 at one vCPU; no network devices at all (-nodefaults).
    qemu-system-x86_64 \
        -accel tcg -cpu max -m 2048 -smp 1 -nodefaults -display none -no-reboot \
        -serial "file:$log" -monitor "unix:$mon,server,nowait" \
        -kernel "$repo/images/out/vmlinuz" -initrd "$work/l1.cpio" \
        -append "console=ttyS0 panic=-1 quiet loglevel=3 nohz=off highres=off" \
        ${L1_QEMU_ARGS:-} </dev/null &
    qemu=$!
    [ -n "${L1_PID_FILE:-}" ] && echo "$qemu" > "$L1_PID_FILE"
    while kill -0 "$qemu" 2>/dev/null; do
        size=$(stat -c %s "$log")
        if [ "$size" != "$last" ]; then
            last=$size
            changed=$SECONDS
        fi
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            kill -9 "$qemu" 2>/dev/null
            wait "$qemu" 2>/dev/null || true
            qemu=""
            cat "$log"
            echo "run-l1: time limit of ${limit}s reached"
            return 124
        fi
        if [ $((SECONDS - changed)) -ge "$stall" ]; then
            stall_report "$qemu" "$mon" || true
            kill -9 "$qemu" 2>/dev/null
            wait "$qemu" 2>/dev/null || true
            qemu=""
            sed 's/^/stalled: /' "$log"
            return 125
        fi
        sleep 2
    done
    local st=0
    wait "$qemu" || st=$?
    qemu=""
    cat "$log"
    return $st
}

st=0
boot_l1 1 || st=$?
exit "$st"
