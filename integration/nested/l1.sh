# Helpers for nested-lane scenarios, sourced by each scenario's /init inside the L1 VM.
# Result lines on the L1 console: "RESULT <name> pass|fail <detail>", then "SCENARIO-DONE".
export PATH=/bin:/sbin:/usr/bin

l1_setup() {
    mount -t proc proc /proc
    mount -t sysfs sys /sys
    mount -t devtmpfs dev /dev 2>/dev/null
    mount -t tmpfs tmp /tmp
    # The unified cgroup hierarchy: vim-agent gives each VMM a cgroup with cpu and memory limits.
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "L1: cannot mount cgroup2"
    while read -r m; do insmod "/modules/$m" || echo "L1: insmod $m failed"; done < /modules/order
    # Huge pages behind our VMM's guest memory (a memfd, which it marks MADV_HUGEPAGE), as QEMU's
    # anonymous guest memory gets them by default (transparent_hugepage/enabled = always): the
    # host setting docs/hotplug.md recommends. Under nested virtualization a 4 KiB page per
    # fault makes a guest touching fresh memory several times slower.
    echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null \
        || echo "L1: cannot enable huge pages for shared memory"
    if [ -c /dev/kvm ]; then
        echo "L1: /dev/kvm ready after $(cut -d' ' -f1 /proc/uptime)s"
    else
        result l1-kvm fail "no /dev/kvm in L1"
        l1_poweroff
    fi
}

result() { # name pass|fail detail...  (no variables: sh has no locals to keep callers' safe)
    echo "RESULT $1 $2 $(shift 2; echo "$*")"
}

l1_poweroff() {
    echo "SCENARIO-DONE"
    poweroff -f
}

# l2_boot NAME TIMEOUT_S VMM_ARGS... : runs our vmm with the L2 Debian guest; console in /tmp/NAME.log.
# Sets L2_STATUS (exit status) and L2_LOG.
l2_boot() {
    name=$1; t=$2; shift 2
    L2_LOG=/tmp/$name.log
    : > "$L2_LOG"
    timeout "$t" vmm run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --serial "file:$L2_LOG" "$@" \
        2> "/tmp/$name.err"
    L2_STATUS=$?
    echo "L1: $name: vmm exit $L2_STATUS after $(cut -d' ' -f1 /proc/uptime)s"
    if [ "$L2_STATUS" != 0 ]; then
        echo "L1: $name: vmm stderr:"; sed 's/^/L1:   /' "/tmp/$name.err"
        echo "L1: $name: guest console (tail):"; tail -n 30 "$L2_LOG" | sed 's/^/L1:   /'
    fi
}

# The value of key=... on the "guest: ready" line of the L2 console (which ends lines with CRLF).
ready_field() { # key
    tr -d '\r' < "$L2_LOG" | sed -n 's/.*guest: ready .*\b'"$1"'=\([^ ]*\).*/\1/p' | head -n 1
}
