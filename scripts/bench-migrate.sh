#!/usr/bin/env bash
# Live-migration benchmark, side by side in one run, same test guest (1 GiB, 2 vCPUs) dirtying
# 0, 16, 64 and 128 MiB/s:
#   - our vmm: source -> target through a directory (tmpfs stands for the shared storage), as
#     reported by `vmm ctl migrate` (downtime = source pause to target resume);
#   - QEMU: live migration between two qemu-system-x86_64 processes over TCP on 127.0.0.1, with
#     max-bandwidth raised so the link is not the limit; downtime and total time from query-migrate;
#   - QEMU save-to-file then restore-to-running ("migrate exec:cat > file", "-incoming exec:cat file").
# Median of RUNS runs per point. Usage: bench-migrate.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
scripts/setup.sh
cargo build --release -p vmm >/dev/null 2>&1
images/build.sh >/dev/null
python3 - "$runs" <<'PY'
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

runs = int(sys.argv[1])
vmm = "target/release/vmm"
guest = "images/out/testguest.elf"
MEM = 1024
QEMU = ["qemu-system-x86_64", "-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host,-arch-capabilities,-cx16",
        "-m", f"{MEM}M", "-smp", "2", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", guest]

def cmdline(rate):
    return f"tg.mode=dirty tg.dirty_mib=512 tg.rate_mib={rate} tg.hb_ms=100" if rate else "tg.mode=hold tg.hb_ms=100"

def wait_path(p, t=10):
    end = time.monotonic() + t
    while not os.path.exists(p):
        if time.monotonic() > end:
            raise SystemExit(f"{p} never appeared")
        time.sleep(0.005)

class Qmp:
    def __init__(self, path):
        wait_path(path)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")
    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                if "error" in r:
                    raise SystemExit(f"QMP {name}: {r['error']}")
                return r["return"]

def ours(rate):
    d = tempfile.mkdtemp(prefix="bench-mig-", dir="/dev/shm")
    try:
        shared = f"{d}/shared"
        t = subprocess.Popen([vmm, "run", "--incoming", shared, "--serial", f"file:{d}/t.log", "--api-socket", f"{d}/t.sock"])
        s = subprocess.Popen([vmm, "run", "--kernel", guest, "--vcpus", "2", "--memory-mib", str(MEM),
                              "--api-socket", f"{d}/s.sock", "--serial", f"file:{d}/s.log", "--cmdline", cmdline(rate)])
        wait_path(f"{d}/s.sock")
        time.sleep(2.0)
        out = subprocess.run([vmm, "ctl", "--api-socket", f"{d}/s.sock", "migrate", "--dir", shared, "--downtime-ms", "20"],
                             capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        s.wait(timeout=30)
        t.kill(); t.wait()
        if r["status"] != "completed":
            raise SystemExit(f"vmm migration failed: {r}")
        return r["downtime_ms"], r["total_ms"], r["bytes_written"]
    finally:
        shutil.rmtree(d, ignore_errors=True)

def qemu_live(rate):
    d = tempfile.mkdtemp(prefix="bench-qmig-")
    port = 47000 + os.getpid() % 1000
    try:
        src = subprocess.Popen(QEMU + ["-append", cmdline(rate), "-serial", f"file:{d}/s.log", "-qmp", f"unix:{d}/s.qmp,server,nowait"])
        dst = subprocess.Popen(QEMU + ["-append", cmdline(rate), "-serial", f"file:{d}/t.log", "-qmp", f"unix:{d}/t.qmp,server,nowait",
                                       "-incoming", f"tcp:127.0.0.1:{port}"])
        qs, qt = Qmp(f"{d}/s.qmp"), Qmp(f"{d}/t.qmp")
        time.sleep(2.0)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 100 * 2**30, "downtime-limit": 20})
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            st = qs.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        for p in (src, dst):
            p.kill(); p.wait()
        if st["status"] != "completed":
            raise SystemExit(f"QEMU migration {st['status']}")
        return st["downtime"], st["total-time"], st["ram"]["total"] and st["ram"]["transferred"]
    finally:
        shutil.rmtree(d, ignore_errors=True)

def qemu_file(rate):
    d = tempfile.mkdtemp(prefix="bench-qsave-", dir="/dev/shm")
    try:
        src = subprocess.Popen(QEMU + ["-append", cmdline(rate), "-serial", f"file:{d}/s.log", "-qmp", f"unix:{d}/s.qmp,server,nowait"])
        qs = Qmp(f"{d}/s.qmp")
        time.sleep(2.0)
        qs.cmd("stop")
        t0 = time.monotonic()
        qs.cmd("migrate", uri=f"exec:cat > {d}/state")
        while qs.cmd("query-migrate").get("status") not in ("completed", "failed"):
            time.sleep(0.005)
        save_ms = (time.monotonic() - t0) * 1000
        src.kill(); src.wait()
        t0 = time.monotonic()
        dst = subprocess.Popen(QEMU + ["-append", cmdline(rate), "-serial", f"file:{d}/t.log", "-qmp", f"unix:{d}/t.qmp,server,nowait",
                                       "-incoming", f"exec:cat {d}/state"])
        qt = Qmp(f"{d}/t.qmp")
        while qt.cmd("query-migrate").get("status") != "completed":
            time.sleep(0.001)
        qt.cmd("cont")
        restore_ms = (time.monotonic() - t0) * 1000
        dst.kill(); dst.wait()
        return save_ms, restore_ms
    finally:
        shutil.rmtree(d, ignore_errors=True)

print(f"migration benchmark: test guest, {MEM} MiB, 2 vCPUs, median of {runs} runs; downtime limit 20 ms for both")
print(f"{'dirty MiB/s':>11s} | {'vmm downtime':>12s} {'total':>9s} {'written MiB':>11s} | {'qemu downtime':>13s} {'total':>9s} {'sent MiB':>9s}")
for rate in (0, 16, 64, 128):
    a = [ours(rate) for _ in range(runs)]
    b = [qemu_live(rate) for _ in range(runs)]
    med = lambda rows, i: statistics.median(r[i] for r in rows)
    print(f"{rate:11d} | {med(a,0):10.1f}ms {med(a,1):7.0f}ms {med(a,2)/2**20:11.1f} | {med(b,0):11.1f}ms {med(b,1):7.0f}ms {med(b,2)/2**20:9.1f}")
c = [qemu_file(0) for _ in range(runs)]
print(f"QEMU save-to-file {statistics.median(r[0] for r in c):.0f} ms, restore-to-running from file {statistics.median(r[1] for r in c):.0f} ms (idle guest)")
PY
