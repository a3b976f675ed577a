#!/bin/sh
# Issue 3: virtio-balloon. Inflating by N MiB lowers the guest's MemAvailable and our vmm's RSS by
# about N; deflating restores MemAvailable; the stats queue is readable over the API. Issue 14:
# with --balloon-stats-ms the VMM polls the statistics itself, and `info` shows the guest's memory
# use before anyone asked for statistics.
. /lib/l1.sh
l1_setup
N=128
S=/tmp/vmm.sock
L2_LOG=/tmp/balloon.log
: > "$L2_LOG"
vmm run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --serial "file:$L2_LOG" --api-socket $S \
    --vcpus 1 --memory-mib 512 --balloon deflate-on-oom --balloon-stats-ms 1000 \
    --cmdline "console=ttyS0 panic=-1 guest.scenario=balloon" 2> /tmp/balloon.err &
pid=$!
avail() { tr -d '\r' < "$L2_LOG" | sed -n 's/.*guest: mem avail_kb=//p' | tail -n 1; }
rss() { awk '/VmRSS/{print $2}' /proc/$pid/status; }
actual() { vmm ctl --api-socket $S balloon-stats | sed -n 's/.*"actual_mib": \([0-9]*\).*/\1/p'; }
wait_actual() { # MiB
    i=0
    while [ $i -lt 90 ]; do [ "$(actual)" = "$1" ] && return 0; sleep 1; i=$((i + 1)); done
    return 1
}
within() { # value expected percent
    [ "$1" -ge $(($2 - $2 * $3 / 100)) ] && [ "$1" -le $(($2 + $2 * $3 / 100)) ]
}
i=0
while ! grep -q "guest: mem" "$L2_LOG" && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
sleep 3
used() { vmm ctl --api-socket $S info | sed -n 's/.*"used_pct": \([0-9.]*\).*/\1/p'; }
i=0
while [ -z "$(used)" ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
u=$(used)
[ -n "$u" ] && awk "BEGIN{exit !($u > 0 && $u < 100)}" && result balloon-polled pass "info used_pct=$u without a stats request" \
    || result balloon-polled fail "info: $(vmm ctl --api-socket $S info | grep -A4 balloon)"
a0=$(avail); r0=$(rss)
echo "L1: before: MemAvailable=${a0}kB vmm RSS=${r0}kB"

vmm ctl --api-socket $S balloon-set $N >/dev/null
if wait_actual $N; then
    sleep 3
    a1=$(avail); r1=$(rss)
    echo "L1: inflated: MemAvailable=${a1}kB vmm RSS=${r1}kB"
    within $((a0 - a1)) $((N * 1024)) 25 && result balloon-guest-avail pass "dropped $(((a0 - a1) / 1024)) MiB" \
        || result balloon-guest-avail fail "MemAvailable $a0 -> $a1 kB"
    within $((r0 - r1)) $((N * 1024)) 25 && result balloon-host-rss pass "dropped $(((r0 - r1) / 1024)) MiB" \
        || result balloon-host-rss fail "RSS $r0 -> $r1 kB"
else
    result balloon-inflate fail "actual never reached $N MiB: $(vmm ctl --api-socket $S balloon-stats)"
fi

stats=$(vmm ctl --api-socket $S balloon-stats)
echo "$stats" | grep -q '"free_memory"' && echo "$stats" | grep -q '"total_memory"' \
    && result balloon-stats pass "$(echo "$stats" | grep -c '": ') fields" || result balloon-stats fail "$stats"

vmm ctl --api-socket $S balloon-set 0 >/dev/null
if wait_actual 0; then
    # The guest reports once a second, but under emulation (two L1s at once in CI) a report can
    # lag by seconds: wait for it, bounded.
    i=0
    while a2=$(avail); ! within "$a2" "$a0" 10 && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
    within "$a2" "$a0" 10 && result balloon-deflate pass "MemAvailable back to $((a2 / 1024)) MiB" \
        || result balloon-deflate fail "MemAvailable $a0 -> $a2 kB"
else
    result balloon-deflate fail "actual never returned to 0"
fi
vmm ctl --api-socket $S balloon-set 100000 2>/dev/null && result balloon-limit fail "oversized target accepted" \
    || result balloon-limit pass ""
vmm ctl --api-socket $S shutdown --timeout-ms 1000 >/dev/null
wait $pid
l1_poweroff
