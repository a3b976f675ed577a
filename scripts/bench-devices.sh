#!/usr/bin/env bash
# Device benchmark in the nested lane: inside one L1 VM, the same Debian guest runs the same disk
# and network work under our vmm and under QEMU microvm (virtio-mmio devices), one after the other.
# Absolute numbers in L1 say little (emulated SVM); the ratio between the two VMMs does.
#   disk: 256 MiB sequential read/write in 1 MiB requests, 16 MiB random read/write in 4 KiB
#         requests, O_DIRECT on /dev/vda (guest-agent bench-disk)
#   net:  256 MiB guest -> L1 over TCP through a tap
#   VMM CPU: user+system time of the VMM's own threads (not the vCPU threads, whose time is mostly
#         the guest's) during each phase, 10 ms resolution; per request for disk, per MiB for net.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
vmm=$(scripts/build-vmm.sh 2>/dev/null)
images/build.sh >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
L1_WITH_QEMU=1 integration/nested/build-l1.sh "$vmm" "$out" 2>/dev/null
integration/nested/run-l1.sh "$out/l1-base.cpio" integration/nested/scenarios/bench-devices.sh 1500 \
    > "$out/console.log" 2>&1 || true
grep -E "^BENCH|^L1: .* did not finish" "$out/console.log" || { tail -n 40 "$out/console.log"; exit 1; }
python3 - "$out/console.log" <<'PY'
import json, re, sys
rows = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"BENCH (\w+) (\S+) (?:cpu_ms=(\d+) )?(.*)", line.strip())
    if not m:
        continue
    kind, phase, cpu, rest = m.groups()
    try:
        data = json.loads(rest)
    except ValueError:
        continue
    rows.setdefault(phase, {})[kind] = (data, int(cpu) if cpu else None)
print(f"\n{'phase':16s} {'vmm':>12s} {'qemu':>12s} {'vmm/qemu':>9s}   {'vmm cpu':>14s} {'qemu cpu':>14s}")
for phase, r in rows.items():
    if "vmm" not in r or "qemu" not in r:
        continue
    (a, ca), (b, cb) = r["vmm"], r["qemu"]
    if "iops" in a and phase.startswith("disk-rand"):
        unit, va, vb = "IOPS", a["iops"], b["iops"]
    else:
        unit, va, vb = "MB/s", a.get("mbps", 0), b.get("mbps", 0)
    per = ""
    if ca is not None and cb is not None:
        n_a = a.get("ops") or a.get("sent", 0) / 2**20
        n_b = b.get("ops") or b.get("sent", 0) / 2**20
        what = "us/req" if "ops" in a else "us/MiB"
        per = f"{ca*1000/max(n_a,1):10.1f} {what} {cb*1000/max(n_b,1):10.1f} {what}"
    print(f"{phase:16s} {va:9.1f} {unit:4s} {vb:7.1f} {unit:4s} {va/vb if vb else 0:7.2f}   {per}")
PY
