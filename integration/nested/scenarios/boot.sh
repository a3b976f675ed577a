#!/bin/sh
# Issue 2: the Debian kernel + initramfs boots under our vmm with 1 and 2 vCPUs; nproc and MemTotal
# match the configuration; `poweroff` in the guest (ACPI S5) ends the vmm with status 0.
. /lib/l1.sh
l1_setup
cmdline="console=ttyS0 panic=-1 guest.scenario=poweroff"
mem_mib=512
for n in 1 2; do
    name=boot-${n}vcpu
    l2_boot "$name" 150 --vcpus "$n" --memory-mib "$mem_mib" --cmdline "$cmdline"
    nproc=$(ready_field nproc)
    memkb=$(ready_field memtotal_kb)
    detail="vmm_exit=$L2_STATUS nproc=$nproc memtotal_kb=$memkb"
    if [ "$L2_STATUS" = 0 ] && [ "$nproc" = "$n" ] && [ -n "$memkb" ] \
        && [ "$memkb" -le $((mem_mib * 1024)) ] && [ "$memkb" -ge $((mem_mib * 1024 * 8 / 10)) ] \
        && grep -q "guest: poweroff" "$L2_LOG"; then
        result "$name" pass "$detail"
    else
        result "$name" fail "$detail"
    fi
done
l1_poweroff
