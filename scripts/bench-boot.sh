#!/usr/bin/env bash
# Boot benchmark, our vmm side by side with QEMU microvm in the same run, both booting the same
# test guest (images/out/testguest.elf) on this machine's KVM:
#   - wall time from process start to the guest's readiness line ("tg: ready"),
#   - VMM memory overhead: the VMM process's RSS minus the guest pages it touched. Both VMMs back
#     guest RAM with a memfd, so guest pages are the RssShmem part and the overhead is
#     VmRSS - RssShmem (anonymous memory plus mapped files such as shared libraries).
# Prints the median (and min/max) of RUNS runs per VMM. Usage: bench-boot.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-15}
scripts/setup.sh
vmm=$(scripts/build-vmm.sh 2>/dev/null)
images/build.sh >/dev/null 2>&1
python3 - "$runs" "$vmm" <<'PY'
import os, statistics, subprocess, sys, time, select, signal

runs = int(sys.argv[1])
guest = "images/out/testguest.elf"
mem = 128
vmms = {
    "vmm": [sys.argv[2], "run", "--kernel", guest, "--memory-mib", str(mem),
            "--cmdline", "tg.mode=hold"],
    "qemu-microvm": ["qemu-system-x86_64", "-M", "microvm,acpi=on,memory-backend=mem", "-enable-kvm",
                     "-cpu", "host,-arch-capabilities,-cx16", "-m", f"{mem}M",
                     "-object", f"memory-backend-memfd,id=mem,size={mem}M",
                     "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                     "-serial", "stdio", "-no-reboot", "-kernel", guest, "-append", "tg.mode=hold"],
}

def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0

def one(cmd):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    buf = b""
    ready = None
    deadline = t0 + 10
    while ready is None and time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], 0.05)
        if r:
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if b"tg: ready" in buf:
                ready = time.monotonic() - t0
    time.sleep(0.3)  # let the guest settle into its hold loop
    rss = status_kib(p.pid, "VmRSS")
    shmem = status_kib(p.pid, "RssShmem")
    anon = status_kib(p.pid, "RssAnon")
    p.send_signal(signal.SIGKILL)
    p.wait()
    if ready is None:
        raise SystemExit(f"{cmd[0]}: no readiness line; output: {buf[-300:]!r}")
    return ready * 1000, (rss - shmem) / 1024, anon / 1024, shmem / 1024

results = {name: [] for name in vmms}
for i in range(runs):
    for name, cmd in vmms.items():  # interleaved, so both see the same machine state
        results[name].append(one(cmd))

def fmt(vals):
    return f"{statistics.median(vals):8.2f}  (min {min(vals):.2f}, max {max(vals):.2f})"

print(f"boot benchmark: {runs} runs each, test guest, 1 vCPU, {mem} MiB")
for name, rs in results.items():
    print(f"{name:14s} boot-to-ready ms   {fmt([r[0] for r in rs])}")
    print(f"{name:14s} overhead MiB       {fmt([r[1] for r in rs])}   (VmRSS - RssShmem)")
    print(f"{name:14s} anon MiB           {fmt([r[2] for r in rs])}")
    print(f"{name:14s} guest touched MiB  {fmt([r[3] for r in rs])}")
ours = statistics.median(r[0] for r in results["vmm"])
theirs = statistics.median(r[0] for r in results["qemu-microvm"])
print(f"ratio vmm/qemu boot-to-ready: {ours / theirs:.2f}")
PY
