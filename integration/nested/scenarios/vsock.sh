#!/bin/sh
# Issue 3: virtio-vsock with the guest agent. Host → guest: the hybrid-vsock CONNECT handshake on
# our Unix socket, then agent requests. Guest → host: the agent connects to the host (CID 2), which
# our vmm forwards to the Unix socket PATH_<port>, where an echo server answers.
. /lib/l1.sh
l1_setup
V=/tmp/v.sock
guest-agent echo-server ${V}_1234 &
echo_pid=$!
L2_LOG=/tmp/vsock.log
: > "$L2_LOG"
vmm run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --serial "file:$L2_LOG" --api-socket /tmp/api.sock \
    --vcpus 2 --memory-mib 512 --vsock cid=3,socket=$V \
    --cmdline "console=ttyS0 panic=-1 guest.scenario=hold" 2> /tmp/vsock.err &
pid=$!
i=0
while ! grep -q "guest: ready" "$L2_LOG" && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
call() { guest-agent call $V 52 "$@" 2>&1; }
i=0
until call ping | grep -q '"pong":true' || [ $i -ge 30 ]; do sleep 1; i=$((i + 1)); done
r=$(call ping)
echo "$r" | grep -q '"pong":true' && result vsock-host-to-guest pass "$r" || result vsock-host-to-guest fail "$r"
r=$(call mem)
echo "$r" | grep -q '"total_kb"' && result vsock-agent-mem pass "$r" || result vsock-agent-mem fail "$r"
r=$(call cpu)
echo "$r" | grep -q '"cpu":1' && result vsock-agent-cpu pass "$r" || result vsock-agent-cpu fail "$r"
r=$(call selftest host-echo 1234)
echo "$r" | grep -q '"passed":true' && result vsock-guest-to-host pass "$r" || result vsock-guest-to-host fail "$r"
r=$(call cpu-online 1 0)
r2=$(call cpu)
r3=$(call cpu-online 1 1)
echo "$r" | grep -q '"online":false' && ! echo "$r2" | grep -q '"cpu":1' && echo "$r3" | grep -q '"online":true' \
    && result vsock-agent-cpu-offline pass "$r2" || result vsock-agent-cpu-offline fail "$r / $r2 / $r3"
r=$(guest-agent call $V 999 ping 2>&1)
echo "$r" | grep -q "refused" && result vsock-refused-port pass "$r" || result vsock-refused-port fail "$r"
vmm ctl --api-socket /tmp/api.sock shutdown --timeout-ms 1000 >/dev/null
wait $pid
kill $echo_pid 2>/dev/null
l1_poweroff
