#!/bin/sh
# vCPU and memory hotplug benchmark (not a test): the same Debian guest (guest.scenario=hotplug,
# which brings every added CPU online and prints its online count and MemTotal every time they
# change, looking every 0.1 s; memory is onlined by the kernel, memhp_default_state=online_movable)
# under our vmm and under QEMU q35 with KVM, in this one L1. For each VMM, RUNS times: add one
# vCPU (ours: `vmm ctl resize --vcpus 2`; QEMU: HMP `device_add host-x86_64-cpu` in the slot of
# core 1, as `info hotpluggable-cpus` lists it for -smp 1,maxcpus=4) and take the
# time until the guest counts 2 online CPUs, then remove it again (`resize --vcpus 1`;
# `device_del`) and take the time until it counts 1. Then RUNS times: 1 GiB more memory by
# virtio-mem with 2 MiB blocks (ours: `resize --memory-mib 1536`; QEMU: a virtio-mem-pci device,
# `qom-set vmem0 requested-size 1 GiB`) until MemTotal has grown by it, and back (`resize
# --memory-mib 512`; requested-size 0) until it is back. All measured the same way, by L1, from
# just before the request to the guest's line in its console (L1's uptime, 10 ms resolution).
# Prints
#   BENCH <vmm|qemu> <add|remove|mem-add|mem-remove> <ms>
. /lib/l1.sh
l1_setup
RUNS=5
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
nproc_now() { tr -d '\r' < "$1" | sed -n 's/.*guest: nproc \([0-9]*\).*/\1/p' | tail -n 1; }
wait_nproc() { # log n polls (of 50 ms)
    i=0
    while [ $i -lt "$3" ]; do
        [ "$(nproc_now "$1")" = "$2" ] && return 0
        sleep 0.05; i=$((i + 1))
    done
    return 1
}
append="console=ttyS0 panic=-1 memhp_default_state=online_movable guest.scenario=hotplug"
memtotal_now() { tr -d '\r' < "$1" | sed -n 's/.*guest: nproc [0-9]* memtotal_kb=\([0-9]*\).*/\1/p' | tail -n 1; }
wait_mem() { # log kib polls: MemTotal within 1 % of kib
    i=0
    while [ $i -lt "$3" ]; do
        m=$(memtotal_now "$1")
        if [ -n "$m" ]; then
            d=$((m - $2)); [ $d -lt 0 ] && d=$((-d))
            [ $d -le $(($2 / 100)) ] && return 0
        fi
        sleep 0.05; i=$((i + 1))
    done
    return 1
}
diag() { # what the VMM and the guest said, when a step was not seen
    [ "$kind" = qemu ] && { echo "info hotpluggable-cpus" >&3; sleep 2; grep -v "$(printf '\033')" /tmp/qmon.log | sed 's/^/L1:   monitor: /' | tail -n 40; }
    tail -n 15 "$log" | sed 's/^/L1:   guest: /'
    tail -n 5 /tmp/hp.err | sed 's/^/L1:   stderr: /'
}
run() { # kind
    kind=$1
    log=/tmp/hp-$kind.log
    : > "$log"
    if [ "$kind" = vmm ]; then
        vmm run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --serial "file:$log" --vcpus 1 \
            --max-vcpus 4 --memory-mib 512 --max-memory-mib 2048 --api-socket /tmp/hp.sock \
            --cmdline "$append" 2> /tmp/hp.err &
        add() { vmm ctl --api-socket /tmp/hp.sock resize --vcpus 2 > /dev/null; }
        remove() { vmm ctl --api-socket /tmp/hp.sock resize --vcpus 1 > /dev/null; }
        mem_add() { vmm ctl --api-socket /tmp/hp.sock resize --memory-mib 1536 --timeout-ms 100000 > /dev/null; }
        mem_remove() { vmm ctl --api-socket /tmp/hp.sock resize --memory-mib 512 --timeout-ms 100000 > /dev/null; }
    else
        rm -f /tmp/qmon.in /tmp/qmon.out
        mkfifo /tmp/qmon.in /tmp/qmon.out
        cat /tmp/qmon.out > /tmp/qmon.log &
        qemu-system-x86_64 -M q35 -enable-kvm -cpu host -m 512M,maxmem=2048M -smp 1,maxcpus=4 -nodefaults \
            -object memory-backend-ram,id=vmem-ram,size=1536M \
            -device virtio-mem-pci,id=vmem0,memdev=vmem-ram,block-size=2M,requested-size=0 \
            -no-user-config -display none -no-reboot -serial "file:$log" \
            -chardev pipe,id=mon0,path=/tmp/qmon -mon chardev=mon0,mode=readline \
            -kernel /l2/vmlinuz -initrd /l2/initramfs.cpio.gz -append "$append" 2> /tmp/hp.err &
        exec 3> /tmp/qmon.in
        add() { echo "device_add host-x86_64-cpu,id=hc1,socket-id=0,core-id=1,thread-id=0" >&3; }
        remove() { echo "device_del hc1" >&3; }
        mem_add() { echo "qom-set vmem0 requested-size 1073741824" >&3; }
        mem_remove() { echo "qom-set vmem0 requested-size 0" >&3; }
    fi
    pid=$!
    if ! wait_nproc "$log" 1 4000; then
        echo "L1: $kind: the guest never came up"; tail -n 20 "$log"; cat /tmp/hp.err
        kill $pid; return
    fi
    sleep 2
    n=0
    while [ $n -lt $RUNS ]; do
        t0=$(ms); add
        if wait_nproc "$log" 2 1200; then echo "BENCH $kind add $(($(ms) - t0))"; else echo "L1: $kind: add not seen"; diag; break; fi
        sleep 1
        t0=$(ms); remove
        if wait_nproc "$log" 1 1200; then echo "BENCH $kind remove $(($(ms) - t0))"; else echo "L1: $kind: remove not seen"; diag; break; fi
        sleep 1
        n=$((n + 1))
    done
    base=$(memtotal_now "$log")
    n=0
    while [ $n -lt $RUNS ]; do
        t0=$(ms); mem_add
        if wait_mem "$log" $((base + 1048576)) 1200; then echo "BENCH $kind mem-add $(($(ms) - t0))"; else echo "L1: $kind: +1 GiB not seen (MemTotal $(memtotal_now "$log"), boot $base)"; diag; break; fi
        sleep 1
        t0=$(ms); mem_remove
        if wait_mem "$log" "$base" 1200; then echo "BENCH $kind mem-remove $(($(ms) - t0))"; else echo "L1: $kind: -1 GiB not seen (MemTotal $(memtotal_now "$log"))"; diag; break; fi
        sleep 1
        n=$((n + 1))
    done
    [ "$kind" = qemu ] && { echo quit >&3; exec 3>&-; }
    kill $pid 2>/dev/null
    wait $pid 2>/dev/null
}
run vmm
run qemu
l1_poweroff
