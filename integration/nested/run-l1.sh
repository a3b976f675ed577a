#!/usr/bin/env bash
# Runs one nested-lane scenario: appends the scenario's /init as a second cpio to the L1 base image
# and boots L1 under QEMU TCG (-cpu max: emulated SVM + NPT). The L1 console goes to stdout; result
# lines look like "RESULT <name> pass|fail <detail>".
#
# Usage: run-l1.sh L1_BASE_CPIO SCENARIO_SCRIPT TIMEOUT_S
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base=${1:?usage: run-l1.sh L1_BASE_CPIO SCENARIO_SCRIPT TIMEOUT_S}
scenario=${2:?}
limit=${3:?}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root"
install -m 0755 "$scenario" "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) > "$work/scenario.cpio"
cat "$base" "$work/scenario.cpio" > "$work/l1.cpio"
# Keep L1 at one vCPU; no network devices at all (-nodefaults).
timeout --foreground -k 5 "$limit" qemu-system-x86_64 \
    -accel tcg -cpu max -m 2048 -smp 1 -nodefaults -display none -no-reboot \
    -serial stdio -monitor none \
    -kernel "$repo/images/out/vmlinuz" -initrd "$work/l1.cpio" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3"
