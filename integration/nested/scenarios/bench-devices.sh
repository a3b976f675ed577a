#!/bin/sh
# Device benchmark (not a test): the same Debian guest, the same guest-side work, under our vmm and
# under QEMU microvm's virtio-mmio devices, in this one L1. Prints
#   BENCH <vmm|qemu> <phase> cpu_ms=<VMM CPU time> <the guest's JSON result>
. /lib/l1.sh
l1_setup
# The VMM's own CPU time: every thread but the vCPUs (ours "vcpuN", QEMU's "CPU N/KVM"), whose
# time is mostly the guest's.
cpu_ticks() {
    for t in /proc/$1/task/*; do
        case "$(cat "$t/comm" 2>/dev/null)" in vcpu* | CPU*) continue ;; esac
        sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}'
    done | awk '{s += $1} END {print s + 0}'
}
hz=100
run() { # kind
    kind=$1
    log=/tmp/bench-$kind.log
    : > "$log"
    dd if=/dev/zero of=/tmp/bench.img bs=1M count=0 seek=512 2>/dev/null
    append="console=ttyS0 panic=-1 guest.scenario=bench"
    if [ "$kind" = vmm ]; then
        vmm run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --serial "file:$log" --vcpus 1 \
            --memory-mib 512 --disk /tmp/bench.img --net tap=tapb --cmdline "$append" 2> /tmp/bench.err &
    else
        qemu-system-x86_64 -M microvm,acpi=on -enable-kvm -cpu host -m 512 -smp 1 -nodefaults \
            -no-user-config -display none -no-reboot -L /usr/share/qemu -serial "file:$log" \
            -kernel /l2/vmlinuz -initrd /l2/initramfs.cpio.gz -append "$append" \
            -drive id=d0,file=/tmp/bench.img,format=raw,if=none -device virtio-blk-device,drive=d0 \
            -netdev tap,id=n0,ifname=tapb,script=no,downscript=no -device virtio-net-device,netdev=n0 \
            2> /tmp/bench.err &
    fi
    pid=$!
    i=0
    while [ ! -e /sys/class/net/tapb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    ip addr add 10.99.0.1/24 dev tapb
    ip link set tapb up
    guest-agent bench-net recv 5001 > /tmp/recv.json 2>&1 &
    seen=""
    t0=0
    i=0
    while kill -0 $pid 2>/dev/null && [ $i -lt 3000 ]; do
        tr -d '\r' < "$log" | sed -n 's/.*guest: bench-\(start\|done\) \([^ ]*\)\(.*\)/\1 \2\3/p' > /tmp/marks
        while read -r what phase rest; do
            case " $seen " in *" $what-$phase "*) continue ;; esac
            seen="$seen $what-$phase"
            if [ "$what" = start ]; then
                t0=$(cpu_ticks $pid)
            else
                t1=$(cpu_ticks $pid)
                echo "BENCH $kind $phase cpu_ms=$(((t1 - t0) * 1000 / hz)) $rest"
            fi
        done < /tmp/marks
        case " $seen " in *" done-net-tx "*) break ;; esac
        sleep 0.1
        i=$((i + 1))
    done
    echo "BENCH $kind net-rx-host $(cat /tmp/recv.json)"
    kill $pid 2>/dev/null
    wait $pid 2>/dev/null
    if ! case " $seen " in *" done-net-tx "*) true ;; *) false ;; esac; then
        echo "L1: $kind did not finish; console tail:"; tail -n 20 "$log"; cat /tmp/bench.err
    fi
    ip link del tapb 2>/dev/null
    rm -f /tmp/bench.img
}
run vmm
run qemu
l1_poweroff
