#!/usr/bin/env bash
# vCPU and memory hotplug benchmark in the nested lane: inside one L1 VM, the same Debian guest
# under our vmm (`vmm ctl resize`) and under QEMU q35 with KVM (`device_add` of a CPU; a
# virtio-mem-pci device's requested-size), one after the other: time from the request to the
# guest seeing the new CPU online or 1 GiB more MemTotal, and to the guest having given it back
# (integration/nested/scenarios/bench-hotplug.sh says how it is measured). Absolute numbers in L1
# (emulated SVM) say little; the ratio between the two VMMs does.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
vmm=$(scripts/build-vmm.sh 2>/dev/null)
images/build.sh >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
L1_WITH_QEMU=1 integration/nested/build-l1.sh "$vmm" "$out" 2>/dev/null
integration/nested/run-l1.sh "$out/l1-base.cpio" integration/nested/scenarios/bench-hotplug.sh 1500 \
    > "$out/console.log" 2>&1 || true
grep -E "^BENCH|^L1: " "$out/console.log" || true
python3 - "$out/console.log" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1], errors="replace"):
    p = line.split()
    if len(p) == 4 and p[0] == "BENCH":
        rows.setdefault((p[1], p[2]), []).append(int(p[3]))
if not rows:
    sys.exit("no figures: see the console above")
print(f"\n{'step':10s} {'vmm median ms':>14s} {'qemu median ms':>15s} {'vmm/qemu':>9s}   (runs, min-max)")
for step in ("add", "remove", "mem-add", "mem-remove"):
    a, b = rows.get(("vmm", step), []), rows.get(("qemu", step), [])
    if not a or not b:
        print(f"{step:10s} missing: vmm {a} qemu {b}")
        continue
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{step:10s} {ma:14.0f} {mb:15.0f} {ma / mb:9.2f}   vmm {len(a)} {min(a)}-{max(a)}, qemu {len(b)} {min(b)}-{max(b)}")
print("target: vmm <= 0.5 x QEMU")
PY
