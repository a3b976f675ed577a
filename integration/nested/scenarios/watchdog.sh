#!/bin/sh
# Issue 13: the host's watchdog. `vim-agent --watchdog /dev/watchdog` feeds it while it runs, its
# clean exit disarms it, and a hung agent (SIGSTOP) has the host reset. The watchdog is softdog,
# loaded to panic instead of rebooting so that the reset names its cause on the console
# ("Software Watchdog Timer expired"); L1 then reboots (panic=-1) and QEMU, run with -no-reboot,
# ends. The test reads that from the console: this scenario's last RESULT is only a failure.
# No queue is needed: the agent arms the watchdog before it reaches NATS (nothing listens on the
# address it is given; it keeps trying).
. /lib/l1.sh
l1_setup
timeout_s=5
up() { cut -d' ' -f1 /proc/uptime; }
while read -r m; do
    args=""
    [ "$m" = softdog.ko ] && args=soft_panic=1
    insmod "/modules/watchdog/$m" $args || { result wd-armed fail "insmod $m failed"; l1_poweroff; }
done < /modules/watchdog/order
mkdir -p /tmp/shared /tmp/agent
echo '{"user":"none","password":"none"}' > /tmp/creds
start_agent() {
    vim-agent --host-id wd --nats-url nats://127.0.0.1:9 --credentials /tmp/creds \
        --state-dir /tmp/agent --shared-dir /tmp/shared --vmm /bin/vmm --vmm-user 64000:64000 \
        --watchdog /dev/watchdog --watchdog-timeout-s $timeout_s 2>>/tmp/agent.log &
    AGENT=$!
}
armed() { # count: true once the agent's log reports the watchdog armed `count` times
    [ "$(grep -c 'watchdog armed' /tmp/agent.log)" -ge "$1" ]
}
wait_armed() { # count
    n=0
    while ! armed "$1"; do
        n=$((n + 1))
        if [ $n -ge 120 ] || ! kill -0 "$AGENT" 2>/dev/null; then
            result wd-armed fail "the agent did not arm the watchdog: $(tail -n 5 /tmp/agent.log)"
            l1_poweroff
        fi
        sleep 0.5
    done
}

# Armed and fed: L1 lives through three timeouts with the agent running.
start_agent
wait_armed 1
result wd-armed pass "$(grep -o 'watchdog armed.*' /tmp/agent.log | head -n 1)"
echo "L1: watchdog armed at $(up)s"
sleep $((3 * timeout_s))
if kill -0 "$AGENT" 2>/dev/null; then
    result wd-fed pass "alive $((3 * timeout_s)) s (3 timeouts) after arming, agent running"
else
    result wd-fed fail "the agent exited: $(tail -n 5 /tmp/agent.log)"
    l1_poweroff
fi

# A clean exit disarms it: L1 lives through two timeouts with no agent at all.
kill -TERM "$AGENT"
n=0
while kill -0 "$AGENT" 2>/dev/null && [ $n -lt 40 ]; do sleep 0.5; n=$((n + 1)); done
if kill -0 "$AGENT" 2>/dev/null || ! grep -q 'watchdog disarmed' /tmp/agent.log; then
    result wd-disarmed fail "the agent did not exit disarming: $(tail -n 5 /tmp/agent.log)"
    l1_poweroff
fi
sleep $((2 * timeout_s))
result wd-disarmed pass "alive $((2 * timeout_s)) s (2 timeouts) after the agent's clean exit"

# A hung agent: the host is reset within the timeout.
start_agent
wait_armed 2
sleep 2
kill -STOP "$AGENT"
echo "WD-AGENT-HUNG at $(up)s"
sleep $((6 * timeout_s))
result wd-reset fail "L1 still up $((6 * timeout_s)) s after the agent hung (timeout ${timeout_s} s)"
l1_poweroff
