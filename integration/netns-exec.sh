#!/bin/sh
# netns-exec.sh NS COMMAND [ARG...]: `ip netns exec NS COMMAND`, with the host's cgroup
# hierarchies mounted again inside. `ip netns exec` gives the command a fresh /sys (so that
# /sys/class/net shows the namespace's devices), which hides /sys/fs/cgroup; a vim-agent there
# could not give its VMMs their cgroups. Mounting a hierarchy again with the same type and
# controllers yields the same hierarchy (the same groups the host sees), as on a real host.
# POSIX sh: the fleet tests and the nested lane's busybox L1 both run it.
ns=$1
shift
# iproute2's ip by its path: busybox sh (the L1's) would run its own applet, which has no netns.
for ip in /bin/ip /sbin/ip /usr/bin/ip /usr/sbin/ip; do
    [ -x "$ip" ] && break
done
exec "$ip" netns exec "$ns" sh -c '
grep -E "^[^ ]+ [^ ]+ cgroup2? " /proc/1/mounts | {
    tmpfs=
    while read -r _ dir type opts _; do
        if [ "$dir" != /sys/fs/cgroup ] && [ -z "$tmpfs" ]; then
            mount -t tmpfs -o mode=0755 cgroups /sys/fs/cgroup
            tmpfs=1
        fi
        mkdir -p "$dir"
        mount -t "$type" -o "$opts" "$type" "$dir" ||
            echo "netns-exec: cannot mount $type ($opts) at $dir" >&2
    done
}
exec "$@"' netns-exec "$@"
