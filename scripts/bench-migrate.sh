#!/usr/bin/env bash
# Live-migration benchmark, side by side in one run, same test guest (1 GiB, 2 vCPUs) dirtying
# 0, 16, 64 and 128 MiB/s, a 20 ms downtime limit for both VMMs:
#   - our vmm: source -> target through a directory (tmpfs stands for the shared storage), as
#     reported by `vmm ctl migrate`: downtime = the source pausing the vCPUs to the target resuming
#     them (the time the target wrote in DIR/resumed), i.e. what the guest sees;
#   - QEMU: live migration between two qemu-system-x86_64 processes over TCP on 127.0.0.1, with
#     max-bandwidth raised so the link is not the limit; downtime measured the same way, what the
#     guest sees: the source's STOP event to the destination's RESUME event (QMP timestamps, one
#     clock), not query-migrate's `downtime`, which counts the source side only; total from
#     query-migrate;
#   - the VIM: `vimctl vm migrate` of the same guest between two agents on this machine (vimd with
#     its own NATS, state and shared storage on tmpfs): the command's wall time against the
#     VMM-level total vimd recorded for that same migration; the difference is what the VIM adds
#     (the queue, the agents, starting the target VMM, the database);
#   - QEMU save-to-file then restore-to-running ("migrate exec:cat > file", "-incoming exec:cat file").
# Median of RUNS runs per point. Usage: bench-migrate.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
scripts/setup.sh
cargo build --release -p vim -p vim-agent >/dev/null 2>&1
vmm=$(scripts/build-vmm.sh 2>/dev/null)
images/build.sh >/dev/null
python3 -u - "$runs" "$vmm" <<'PY'
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

runs = int(sys.argv[1])
vmm = sys.argv[2]
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
    """A QMP connection. A reader thread takes every line: replies go to `cmd`, events are kept
    (with QEMU's timestamps) for `event_time`."""
    def __init__(self, path):
        import queue, threading
        wait_path(path)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.events = []
        self.replies = queue.Queue()
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.cmd("qmp_capabilities")
    def _read(self):
        try:
            for line in self.f:
                r = json.loads(line)
                if "event" in r:
                    with self.cv:
                        self.events.append(r)
                        self.cv.notify_all()
                else:
                    self.replies.put(r)
        except OSError:
            pass  # QEMU was killed: its end of the connection is gone
    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        r = self.replies.get(timeout=30)
        if "error" in r:
            raise SystemExit(f"QMP {name}: {r['error']}")
        return r["return"]
    def event_time(self, name, timeout=10):
        """The timestamp (seconds) of the first `name` event, waiting for it."""
        with self.cv:
            ok = self.cv.wait_for(lambda: any(e["event"] == name for e in self.events), timeout)
            if not ok:
                raise SystemExit(f"no QMP {name} event")
            e = next(e for e in self.events if e["event"] == name)
            return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6

def ours(rate):
    d = tempfile.mkdtemp(prefix="bench-mig-", dir="/dev/shm")
    procs = []
    try:
        shared = f"{d}/shared"
        procs.append(subprocess.Popen([vmm, "run", "--incoming", shared, "--serial", f"file:{d}/t.log", "--api-socket", f"{d}/t.sock"],
                                      stderr=open(f"{d}/t.err", "w")))
        s = subprocess.Popen([vmm, "run", "--kernel", guest, "--vcpus", "2", "--memory-mib", str(MEM),
                              "--api-socket", f"{d}/s.sock", "--serial", f"file:{d}/s.log", "--cmdline", cmdline(rate)])
        procs.append(s)
        wait_path(f"{d}/s.sock")
        time.sleep(2.0)
        out = subprocess.run([vmm, "ctl", "--api-socket", f"{d}/s.sock", "migrate", "--dir", shared, "--downtime-ms", "20"],
                             capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        s.wait(timeout=30)
        if r["status"] != "completed":
            raise SystemExit(f"vmm migration failed: {r}")
        return r["downtime_ms"], r["total_ms"], r["bytes_written"]
    finally:
        for p in procs:
            p.kill(); p.wait()
        shutil.rmtree(d, ignore_errors=True)

def qemu_live(rate):
    d = tempfile.mkdtemp(prefix="bench-qmig-")
    port = 47000 + os.getpid() % 1000
    procs = []
    try:
        src = subprocess.Popen(QEMU + ["-append", cmdline(rate), "-serial", f"file:{d}/s.log", "-qmp", f"unix:{d}/s.qmp,server,nowait"])
        procs.append(src)
        dst = subprocess.Popen(QEMU + ["-append", cmdline(rate), "-serial", f"file:{d}/t.log", "-qmp", f"unix:{d}/t.qmp,server,nowait",
                                       "-incoming", f"tcp:127.0.0.1:{port}"])
        procs.append(dst)
        qs, qt = Qmp(f"{d}/s.qmp"), Qmp(f"{d}/t.qmp")
        time.sleep(2.0)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 100 * 2**30, "downtime-limit": 20})
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            st = qs.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        if st["status"] != "completed":
            raise SystemExit(f"QEMU migration {st['status']}")
        # What the guest sees: its vCPUs stop on the source, resume on the destination.
        downtime = (qt.event_time("RESUME") - qs.event_time("STOP")) * 1000
        return downtime, st["total-time"], st["ram"]["transferred"], st["downtime"]
    finally:
        for p in procs:
            p.kill(); p.wait()
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

class Vim:
    """vimd (its own NATS) and two agents on this machine, state and shared storage on tmpfs."""
    def __init__(self):
        self.d = tempfile.mkdtemp(prefix="bench-vim-", dir="/dev/shm")
        self.procs = []
        port = 47600 + os.getpid() % 200
        self.env = dict(os.environ, VIM_API=f"https://127.0.0.1:{port}", VIM_TOKEN_FILE=f"{self.d}/vim/admin.token",
                        VIM_CA=f"{self.d}/vim/tls/ca.pem")
        self.bridge = "vimbench0"
        self.made_bridge = not os.path.exists(f"/sys/class/net/{self.bridge}")
        log = open(f"{self.d}/vimd.log", "w")
        self.procs.append(subprocess.Popen(["target/release/vimd", "--state-dir", f"{self.d}/vim", "--listen", f"127.0.0.1:{port}",
                                            "--nats-listen", f"127.0.0.1:{port + 1}", "--heartbeat-ms", "500"], stderr=log))
        self.wait(lambda: os.path.exists(self.env["VIM_TOKEN_FILE"]) and self.ctl("hosts", check=False) is not None)
        for h in ("h1", "h2"):
            creds = json.loads(self.ctl("host", "add", h, "--json"))["credentials_file"]
            self.procs.append(subprocess.Popen(
                ["target/release/vim-agent", "--host-id", h, "--nats-url", f"nats://127.0.0.1:{port + 1}", "--credentials", creds,
                 "--nats-ca", self.env["VIM_CA"], "--state-dir", f"{self.d}/agent-{h}", "--shared-dir", f"{self.d}/vim/shared",
                 "--vmm", os.path.abspath(vmm), "--heartbeat-ms", "500", "--bridge", self.bridge],
                stderr=open(f"{self.d}/agent-{h}.log", "w")))
        self.wait(lambda: self.ctl("hosts").count("reachable") == 2)
    def ctl(self, *args, check=True):
        r = subprocess.run(["target/release/vimctl", *args], capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            if check:
                raise SystemExit(f"vimctl {' '.join(args)}: {r.stderr}")
            return None
        return r.stdout
    def wait(self, f, t=30):
        end = time.monotonic() + t
        while not f():
            if time.monotonic() > end:
                raise SystemExit("the bench fleet did not come up")
            time.sleep(0.1)
    def migrate(self, rate):
        image = f"tg{rate}"
        # Added once per rate (again: refused, as it exists).
        self.ctl("image", "add", image, "--kernel", os.path.abspath(guest), "--cmdline", cmdline(rate), "--json", check=False)
        vm = self.ctl("vm", "create", "--name", f"b{rate}", "--image", image, "--vcpus", "2",
                      "--memory-mib", str(MEM), "--no-net").strip()
        time.sleep(2.0)
        t0 = time.monotonic()
        self.ctl("vm", "migrate", vm, "--downtime-ms", "20")
        wall = (time.monotonic() - t0) * 1000
        m = json.loads(self.ctl("vm", "show", vm))["last_migration"]
        self.ctl("vm", "delete", vm)
        return wall, m["total_ms"], m["downtime_ms"]
    def close(self):
        for p in reversed(self.procs):
            p.terminate(); p.wait()
        # VMMs outlive their agent (their own process group): any left (a run that failed
        # before its delete) are killed by pid, found by this fleet's directory.
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if self.d in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                    os.kill(int(pid), 9)
            except OSError:
                pass
        # The VMs were deleted; nothing of theirs runs. The bridge the agents made goes too.
        if self.made_bridge:
            subprocess.run(["ip", "link", "del", self.bridge], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.d, ignore_errors=True)

print(f"migration benchmark: test guest, {MEM} MiB, 2 vCPUs, median of {runs} runs; downtime limit 20 ms for both;")
print("downtime = what the guest sees (vCPUs stopped on the source to resumed on the target) for both VMMs")
print(f"{'dirty MiB/s':>11s} | {'vmm downtime':>12s} {'total':>9s} {'written MiB':>11s} | {'qemu downtime':>13s} {'total':>9s} {'sent MiB':>9s} {'(qemu own field)':>16s}")
med = lambda rows, i: statistics.median(r[i] for r in rows)
for rate in (0, 16, 64, 128):
    a = [ours(rate) for _ in range(runs)]
    b = [qemu_live(rate) for _ in range(runs)]
    print(f"{rate:11d} | {med(a,0):10.1f}ms {med(a,1):7.0f}ms {med(a,2)/2**20:11.1f} | {med(b,0):11.1f}ms {med(b,1):7.0f}ms {med(b,2)/2**20:9.1f} {med(b,3):14.1f}ms")
fleet = Vim()
try:
    print(f"{'dirty MiB/s':>11s} | {'vimctl vm migrate':>17s} {'vmm total':>9s} {'VIM adds':>9s} {'downtime':>9s}")
    for rate in (0, 16, 64, 128):
        v = [fleet.migrate(rate) for _ in range(runs)]
        adds = statistics.median(r[0] - r[1] for r in v)
        print(f"{rate:11d} | {med(v,0):15.0f}ms {med(v,1):7.0f}ms {adds:7.0f}ms {med(v,2):7.1f}ms")
finally:
    fleet.close()
c = [qemu_file(0) for _ in range(runs)]
print(f"QEMU save-to-file {statistics.median(r[0] for r in c):.0f} ms, restore-to-running from file {statistics.median(r[1] for r in c):.0f} ms (idle guest)")
PY
