#!/bin/sh
# /init of one L1 in the power-loss scenario (power-loss.sh): a host of a fleet whose vimd, NATS
# and NFS server run on the CI machine. L1 reaches them through QEMU's user network (10.0.2.2 is
# the CI machine's loopback), mounts the shared storage over NFS at the very path vimd uses for
# it, and runs vim-agent until its QEMU is killed (the power loss) or the driver leaves a `done`
# file on the share. /etc/scenario.env (from the driver) names HOST_ID, NATS_PORT, NFS_PORT and
# EXPORT, and /etc/join-command the host's join command.
. /lib/l1.sh
l1_setup
. /etc/scenario.env
/bin/ip link set lo up
/bin/ip link set eth0 up
/bin/ip addr add 10.0.2.15/24 dev eth0
/bin/ip route add default via 10.0.2.2
mkdir -p "$EXPORT"
# Each L1 must present its own NFSv4 client identity. Linux builds it from the node name, which is
# "(none)" in both L1s unless set: the server then took the second mount for the first client
# rebooted, and one of the two mounts failed with EIO (or, worse, one host's locks went with it).
echo "$HOST_ID" > /proc/sys/kernel/hostname
# Hard mount: a write waits for the server rather than failing (what a VM's disk wants).
if ! mount -t nfs4 -o "vers=4.1,port=$NFS_PORT,addr=10.0.2.2,clientaddr=10.0.2.15,hard,timeo=100" \
    10.0.2.2:/share "$EXPORT"; then
    result "l1-$HOST_ID-nfs" fail "cannot mount the share"
    l1_poweroff
fi
echo "L1: $HOST_ID: share mounted after $(cut -d' ' -f1 /proc/uptime)s"
mkdir -p "$EXPORT/logs"
# The join: the command the driver got from `vimctl host add --join`, run as an operator would
# (VIM_JOIN_ROOT=/: unpacked with dpkg-deb into this root, as no apt or systemd runs here), under
# Debian's shell as on a real host (build-l1.sh says why).
if PATH="/opt/debian/bin:$PATH" VIM_JOIN_ROOT=/ dash -c "$(cat /etc/join-command)" > /tmp/join.log 2>&1; then
    # For the driver (L1's console reaches it only when L1 ends).
    cp /tmp/join.log "$EXPORT/logs/join-$HOST_ID.log"
    echo "L1: $(grep '^join:' /tmp/join.log)"
else
    echo "L1: $HOST_ID: the join failed: $(cat /tmp/join.log)"
    l1_poweroff
fi
/usr/bin/vim-agent --config /etc/vim-agent/agent.toml --heartbeat-ms 1000 \
    2>"$EXPORT/logs/agent-$HOST_ID.log" &
# The VMMs' logs go to the share every 2 s (for the driver to show), a line every 20 s keeps
# run-l1.sh's stall watch quiet; the driver ends it.
n=0
while [ ! -e "$EXPORT/conf/done" ]; do
    sleep 2
    for f in /var/lib/vim-agent/vms/*.vmm.log; do
        [ -e "$f" ] && cp "$f" "$EXPORT/logs/$HOST_ID-$(basename "$f")"
    done
    n=$((n + 1))
    [ $((n % 10)) = 0 ] && echo "L1: $HOST_ID up $(cut -d' ' -f1 /proc/uptime)s, $(ps -o args | grep -c '^/bin/vmm run') VMMs"
done
l1_poweroff
