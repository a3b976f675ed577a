#!/usr/bin/env bash
# The main job, for now: build the VMM and the guest images, then boot a 2-vCPU test guest on this
# machine's KVM and show its console: it walks our ACPI tables, starts its second CPU, prints six
# heartbeats and powers itself off through ACPI, which ends the VMM with status 0.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm
images/build.sh
echo "--- booting the test guest: 2 vCPUs, 256 MiB ---"
exec target/release/vmm run --kernel images/out/testguest.elf --vcpus 2 --memory-mib 256 \
    --cmdline "tg.mode=smp tg.then=hold tg.hb_ms=500 tg.stop_after=6"
