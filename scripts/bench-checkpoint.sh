#!/usr/bin/env bash
# Checkpoint benchmark (docs/checkpoint.md), with the test guest on this machine's KVM and the
# static vmm, checkpoints on this machine's disk (/var/tmp):
#  1. Pause per checkpoint: a 1 GiB guest with a 64 MiB disk, dirtying 16 MiB/s (a 512 MiB
#     region, one write per 4 KiB page) and writing its disk at each 100 ms heartbeat, checkpointed
#     every 5 s and every 1 s, CKPTS checkpoints each after the two whole ones that start a VMM's
#     series. The pause is the VMM's own measure (pause -> resume around the last round and the
#     state); also the whole checkpoint's time and bytes.
#  2. The guest's lost throughput: the same guest dirtying as fast as it can, for 20 s without
#     checkpoints, with one every 5 s and one every 1 s: MiB it dirtied per second of wall time,
#     read from its own heartbeat lines.
#  3. Recovery time in the fleet (scripts/benchfleet.py: vimd's fast profile, 1 s heartbeats,
#     3 misses, 2 s lease; three hosts in network namespaces): a host with one VM crashes (agent
#     and VMM SIGKILLed); RTO = the crash -> the VM's console grows again on another host (a
#     booted guest's readiness line, a resumed guest's next heartbeat: it beats every 100 ms, so
#     up to 100 ms of a resume's figure is the guest's wait for its next beat). `--ha restart`
#     against `--ha resume --checkpoint-s 1` and `--ha standby --checkpoint-s 1` (its standby
#     VMM on another host promoted, docs/standby.md), median of RUNS, with the part before vimd
#     starts the failover (VM_Failover_Started: detection, the lease) and the part after.
#  4. What the standby saves once the failure is detected: a 1 GiB guest dirtying its 512 MiB
#     working set, checkpointed every second, its VMM SIGKILLed, the page cache dropped (the host
#     taking over never read the checkpoint); resumed by `restore --checkpoint` (memory faulted
#     in from the checkpoint's file as the guest touches it) or by promoting a standby (memory
#     already in it): the time to its first heartbeat and how much it dirties in its first two
#     seconds (its steady rate is part 2's). Median of RUNS.
# Usage: bench-checkpoint.sh [CKPTS] [RUNS] [PARTS]   (PARTS: which of 1,2,3,4; default all)
set -euo pipefail
cd "$(dirname "$0")/.."
ckpts=${1:-10}
runs=${2:-5}
parts=${3:-1,2,3,4}
vmm=$(scripts/build-vmm.sh 2>/dev/null)
images/build.sh >/dev/null
python3 -u - "$ckpts" "$vmm" "$runs" "$parts" <<'PY'
import json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, time

ckpts = int(sys.argv[1])
vmm = sys.argv[2]
guest = "images/out/testguest.elf"

def call(sock, req, timeout=120):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock)
    s.sendall((json.dumps(req) + "\n").encode())
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit(f"{req}: the VMM closed the connection (did it die? its stderr is above)")
        data += chunk
    r = json.loads(data)
    if not r["ok"]:
        raise SystemExit(f"{req}: {r['error']}")
    return r["result"]

def wait_sock(path, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            call(path, {"command": "info"})
            return
        except OSError:
            time.sleep(0.001)
    raise SystemExit(f"no API at {path}")

def guest_vm(d, rate):
    disk = f"{d}/disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    sock = f"{d}/api.sock"
    p = subprocess.Popen([vmm, "run", "--kernel", guest, "--memory-mib", "1024", "--disk", disk,
                          "--api-socket", sock, "--serial", f"file:{d}/console.log", "--cmdline",
                          f"tg.mode=dirty tg.dirty_mib=512 tg.rate_mib={rate} tg.hb_ms=100 tg.disk_hb=1"])
    wait_sock(sock)
    return p, sock

def pauses(every_s):
    d = tempfile.mkdtemp(prefix="bench-ckpt-", dir="/var/tmp")
    try:
        p, sock = guest_vm(d, 16)
        time.sleep(2)
        done = []
        for i in range(ckpts + 2):
            t = time.monotonic()
            done.append(call(sock, {"command": "checkpoint", "dir": f"{d}/ckpt"}))
            time.sleep(max(0.0, every_s - (time.monotonic() - t)))
        p.kill(); p.wait()
        inc = [c for c in done if not c["full"]]
        return inc, done[:2]
    finally:
        shutil.rmtree(d, ignore_errors=True)

def dirtied(console):
    """(wall-clock reading order is the file's) the guest's dirtied_mib at each heartbeat."""
    return [int(m) for m in re.findall(r"dirtied_mib=(\d+)", console)]

def throughput(every_s, secs=20):
    d = tempfile.mkdtemp(prefix="bench-ckpt-", dir="/var/tmp")
    try:
        # As fast as it can: more per 10 ms tick than it manages in one (~5 MiB here), but
        # little enough that it prints its heartbeats (and count) every few ticks.
        p, sock = guest_vm(d, 2000)
        time.sleep(2)
        def mib():
            v = dirtied(open(f"{d}/console.log").read())
            return v[-1] if v else 0
        m0, t0 = mib(), time.monotonic()
        end = t0 + secs
        pause_total = 0.0
        while time.monotonic() < end:
            if every_s:
                t = time.monotonic()
                pause_total += call(sock, {"command": "checkpoint", "dir": f"{d}/ckpt"})["pause_ms"]
                time.sleep(max(0.0, min(end - time.monotonic(), every_s - (time.monotonic() - t))))
            else:
                time.sleep(0.2)
        m1, t1 = mib(), time.monotonic()
        p.kill(); p.wait()
        return (m1 - m0) / (t1 - t0), pause_total
    finally:
        shutil.rmtree(d, ignore_errors=True)

parts = sys.argv[4].split(",")
print("checkpoint benchmark: test guest, 1 GiB, 64 MiB disk, checkpoints on local disk (/var/tmp); static vmm")
if "1" in parts:
  print(f"1. pause per incremental checkpoint, guest dirtying 16 MiB/s; {ckpts} checkpoints after the 2 whole ones")
  print(f"{'every':>6s} {'pause median':>13s} {'p90':>8s} {'max':>8s} {'total median':>13s} {'MiB written':>12s} {'whole: pause, total, MiB':>26s}")
  for every in (5, 1):
      inc, whole = pauses(every)
      ps = sorted(c["pause_ms"] for c in inc)
      print(f"{every:5d}s {statistics.median(ps):11.2f}ms {ps[int(0.9 * (len(ps) - 1))]:6.2f}ms {max(ps):6.2f}ms "
            f"{statistics.median(c['total_ms'] for c in inc):11.1f}ms "
            f"{statistics.median(c['bytes_written'] for c in inc) / 2**20:11.1f} "
            f"{whole[0]['pause_ms']:9.2f}ms {whole[0]['total_ms']:8.1f}ms {whole[0]['bytes_written'] / 2**20:6.1f}")
if "2" in parts:
  print("2. the guest's throughput (MiB dirtied per wall-clock second, as fast as it can), 20 s each")
  base, _ = throughput(0)
  print(f"{'checkpoints':>12s} {'MiB/s':>8s} {'lost':>7s} {'paused':>8s}")
  print(f"{'none':>12s} {base:8.1f} {'-':>7s} {'-':>8s}")
  for every in (5, 1):
      t, paused = throughput(every)
      print(f"{'every ' + str(every) + ' s':>12s} {t:8.1f} {100 * (1 - t / base):6.1f}% {paused / (20 * 1000) * 100:7.2f}%")
print("target: pause <= 20 ms at every 5 s for a 1 GiB guest dirtying 16 MiB/s")

def after_failure(standby):
    """A 1 GiB guest dirtying its 512 MiB working set as fast as it can, checkpointed every
    second (4 times); its VMM SIGKILLed; then resumed from the newest checkpoint by a new VMM
    (`restore --checkpoint`) or by promoting a standby that followed the checkpoints. The page
    cache is dropped first: the host that takes over never read the checkpoint (it was written
    on another host). Returns (seconds from the kill to the guest's first heartbeat, MiB it
    dirtied in its first second, in its next second, promote's own took_ms or None)."""
    d = tempfile.mkdtemp(prefix="bench-ckpt-", dir="/var/tmp")
    procs = []
    try:
        p, sock = guest_vm(d, 2000)
        procs.append(p)
        time.sleep(2)
        sb_sock = f"{d}/standby.sock"
        if standby:
            procs.append(subprocess.Popen([vmm, "restore", "--checkpoint", f"{d}/ckpt", "--standby",
                                           "--api-socket", sb_sock, "--serial", f"file:{d}/console.log"]))
            wait_sock(sb_sock)
        for _ in range(4):
            seq = call(sock, {"command": "checkpoint", "dir": f"{d}/ckpt"})["seq"]
            time.sleep(1)
        if standby:
            end = time.monotonic() + 60
            while call(sb_sock, {"command": "info"}).get("standby_seq") != seq:
                if time.monotonic() > end:
                    raise SystemExit("the standby did not follow")
                time.sleep(0.05)
        p.kill(); p.wait()
        size = os.path.getsize(f"{d}/console.log")
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        t0 = time.monotonic()
        took = None
        if standby:
            took = call(sb_sock, {"command": "promote"})["took_ms"]
        else:
            procs.append(subprocess.Popen([vmm, "restore", "--checkpoint", f"{d}/ckpt", "--api-socket",
                                           f"{d}/r.sock", "--serial", f"file:{d}/console.log"],
                                          stderr=subprocess.DEVNULL))
        seen = []   # (seconds since the kill, dirtied_mib) of each heartbeat after it
        while time.monotonic() - t0 < 30:
            with open(f"{d}/console.log", errors="replace") as f:
                f.seek(size)
                v = dirtied(f.read())
            now = time.monotonic() - t0
            seen += [(now, m) for m in v[len(seen):]]
            if seen and now - seen[0][0] > 2.05:
                break
            time.sleep(0.005)
        if not seen:
            raise SystemExit(f"the guest did not come back; see {d}")
        first_t, first_m = seen[0]
        def at(s):
            return max(m for t, m in seen if t <= first_t + s)
        return first_t, at(1) - first_m, at(2) - at(1), took
    finally:
        for p in procs:
            p.kill(); p.wait()
        shutil.rmtree(d, ignore_errors=True)

if "4" in parts:
    runs4 = int(sys.argv[3])
    print(f"4. after the failure, page cache dropped (the new host never read the checkpoint): median of {runs4}")
    print(f"{'how':>22s} {'back after':>11s} {'MiB dirtied 1st s':>18s} {'2nd s':>8s} {'promote took':>13s}")
    for standby in (False, True):
        r = [after_failure(standby) for _ in range(runs4)]
        took = [x[3] for x in r if x[3] is not None]
        print(f"{'promoted standby' if standby else 'restore --checkpoint':>22s} "
              f"{statistics.median(x[0] for x in r):10.3f}s {statistics.median(x[1] for x in r):17.0f} "
              f"{statistics.median(x[2] for x in r):8.0f} "
              f"{(f'{statistics.median(took):10.1f}ms') if took else '-':>13s}")

if "3" not in parts:
    sys.exit(0)
sys.path.insert(0, "scripts")
from benchfleet import Fleet, prepare
prepare()
runs = int(sys.argv[3])

def rto(fleet, ha):
    args = ["vm", "create", "--name", "r", "--image", "tg", "--memory-mib", "64", "--no-net", "--ha", ha]
    if ha in ("resume", "standby"):
        args += ["--checkpoint-s", "1"]
    [vm] = fleet.create_on("h1", [args])
    fleet.wait(lambda: fleet.readies(vm) >= 1, what="the VM to boot")
    ckpt = f"{fleet.d}/vim/shared/vms/{vm}/checkpoint"
    if ha == "standby":
        fleet.wait(lambda: any(e["kind"] == "VM_Standby_Ready" and e["vm_id"] == vm
                               for e in json.loads(fleet.ctl("events", "--json"))),
                   what="the standby")
    if ha in ("resume", "standby"):
        fleet.wait(lambda: os.path.isdir(ckpt) and any(
            n.startswith("ckpt-") and n[5:].isdigit() and int(n[5:]) >= 3 for n in os.listdir(ckpt)),
            what="three checkpoints")
    time.sleep(2.5)
    t0, wall0 = time.monotonic(), time.time()
    fleet.crash("h1")
    size = len(fleet.console(vm))
    end = t0 + 120
    while len(fleet.console(vm)) <= size:
        if time.monotonic() > end:
            raise SystemExit(f"the VM is not back within 120 s; see {fleet.d}")
        time.sleep(0.005)
    back = time.monotonic() - t0
    first = fleet.console(vm)[size:].splitlines()[0]
    kind = "booted" if first.startswith("tg: ready") else "resumed"
    fleet.wait(lambda: any(e["kind"] == "VM_Restarted" and e["vm_id"] == vm
                           for e in json.loads(fleet.ctl("events", "--json"))), what="VM_Restarted")
    events = json.loads(fleet.ctl("events", "--json"))
    restarted = [json.loads(e["detail"]) for e in events if e["kind"] == "VM_Restarted" and e["vm_id"] == vm]
    if kind == "resumed" and (restarted[0].get("checkpoint") or {}).get("promoted"):
        kind = "promoted"
    started = min(e["ts"] for e in events if e["kind"] == "VM_Failover_Started" and e["vm_id"] == vm)
    detect = started / 1000 - wall0
    fleet.start_agent("h1")
    fleet.clear([vm])
    return back, detect, kind

print(f"3. RTO, a host with one VM crashes: median of {runs}")
print(f"{'profile':>34s} {'ha':>8s} {'RTO median':>11s} {'min':>7s} {'max':>7s} {'detection':>10s} {'after':>8s}  how it came back")
for hb, lease in ((1000, 2000), (250, 1000)):
    f = Fleet(("h1", "h2", "h3"), cmdline="tg.mode=hold tg.hb_ms=100 tg.disk_hb=1", prefix="bench-ck",
              heartbeat_ms=hb, lease_ms=lease)
    profile = f"heartbeats {hb} ms x3, lease {lease} ms"
    try:
        for ha in ("restart", "resume", "standby"):
            r = [rto(f, ha) for _ in range(runs)]
            backs = [x[0] for x in r]
            det = statistics.median(x[1] for x in r)
            kinds = ",".join(sorted(set(x[2] for x in r)))
            print(f"{profile:>34s} {ha:>8s} {statistics.median(backs):10.2f}s {min(backs):6.2f}s {max(backs):6.2f}s "
                  f"{det:9.2f}s {statistics.median(backs) - det:7.2f}s  {kinds}")
    finally:
        f.close()
print("target (issue 15): resume <= 3 s, promotion (standby) <= 2 s; detection is the lease (docs/failover.md), the same for all")
PY
