#!/usr/bin/env bash
# Snapshot benchmark with the test guest on this machine's KVM: snapshot save time (the API's own
# measure) and restore-to-running (process start of `vmm restore` until its API answers "running",
# which is after the vCPUs run) for 256 MiB and 1 GiB guests that have dirtied 64 MiB.
# Median of RUNS runs. Usage: bench-snapshot.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
vmm=$(scripts/build-vmm.sh 2>/dev/null)
images/build.sh >/dev/null
python3 - "$runs" "$vmm" <<'PY'
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

runs = int(sys.argv[1])
vmm = sys.argv[2]
guest = "images/out/testguest.elf"

def call(sock, req):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sock)
    s.sendall((json.dumps(req) + "\n").encode())
    data = b""
    while not data.endswith(b"\n"):
        data += s.recv(65536)
    return json.loads(data)

def wait_sock(path, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if call(path, {"command": "info"})["ok"]:
                return
        except OSError:
            time.sleep(0.0005)
    raise SystemExit(f"no API at {path}")

def one(mem):
    d = tempfile.mkdtemp(prefix="bench-snap-")
    try:
        sock = f"{d}/a.sock"
        p = subprocess.Popen([vmm, "run", "--kernel", guest, "--memory-mib", str(mem), "--api-socket", sock,
                              "--serial", f"file:{d}/c.log", "--cmdline",
                              "tg.mode=dirty tg.dirty_mib=64 tg.rate_mib=128 tg.hb_ms=100"])
        wait_sock(sock)
        time.sleep(0.8)  # 64 MiB dirtied at 128 MiB/s
        call(sock, {"command": "pause"})
        r = call(sock, {"command": "snapshot", "dir": f"{d}/snap"})
        save_ms = r["result"]["ms"]
        p.kill(); p.wait()
        sock2 = f"{d}/b.sock"
        t0 = time.monotonic()
        q = subprocess.Popen([vmm, "restore", "--snapshot", f"{d}/snap", "--api-socket", sock2,
                              "--serial", f"file:{d}/c2.log"])
        wait_sock(sock2)
        restore_ms = (time.monotonic() - t0) * 1000
        q.kill(); q.wait()
        return save_ms, restore_ms
    finally:
        shutil.rmtree(d, ignore_errors=True)

print(f"snapshot benchmark: test guest, 64 MiB dirtied, median of {runs} runs")
for mem in (256, 1024):
    rs = [one(mem) for _ in range(runs)]
    print(f"{mem:5d} MiB  save {statistics.median(r[0] for r in rs):7.1f} ms   "
          f"restore-to-running {statistics.median(r[1] for r in rs):6.2f} ms")
PY
