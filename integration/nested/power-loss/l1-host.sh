#!/bin/sh
# /init of one L1 in the power-loss scenario (power-loss.sh): a host of a fleet whose vimd, NATS
# and NFS server run on the CI machine. L1 reaches them through QEMU's user network (10.0.2.2 is
# the CI machine's loopback), mounts the shared storage over NFS at the very path vimd uses for
# it, and runs vim-agent until its QEMU is killed (the power loss) or the driver leaves a `done`
# file on the share. /etc/scenario.env (from the driver) names HOST_ID, NATS_PORT, NFS_PORT and
# EXPORT.
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
vim-agent --host-id "$HOST_ID" --nats-url "nats://10.0.2.2:$NATS_PORT" \
    --credentials "$EXPORT/conf/$HOST_ID.json" --nats-ca "$EXPORT/conf/ca.pem" \
    --state-dir /tmp/agent --shared-dir "$EXPORT/shared" --vmm /bin/vmm --vmm-user 64000:64000 \
    --heartbeat-ms 1000 2>"$EXPORT/logs/agent-$HOST_ID.log" &
# The VMMs' logs go to the share every 2 s (for the driver to show), a line every 20 s keeps
# run-l1.sh's stall watch quiet; the driver ends it.
n=0
while [ ! -e "$EXPORT/conf/done" ]; do
    sleep 2
    for f in /tmp/agent/vms/*.vmm.log; do
        [ -e "$f" ] && cp "$f" "$EXPORT/logs/$HOST_ID-$(basename "$f")"
    done
    n=$((n + 1))
    [ $((n % 10)) = 0 ] && echo "L1: $HOST_ID up $(cut -d' ' -f1 /proc/uptime)s, $(ps -o args | grep -c '^/bin/vmm run') VMMs"
done
l1_poweroff
