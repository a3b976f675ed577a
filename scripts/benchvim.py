"""The VIM's benchmark matrix (scripts/bench-vim.sh runs it): API latency and throughput for list,
show and submit at {0, 10,000} heartbeating hosts x {1,000, 100,000} VMs, heartbeat misses, vimd's
CPU and RSS, on SQLite and on PostgreSQL, each cell repeated; one table of medians and spreads.

Each repeat of a (database, VMs) pair starts from an empty database that `seed` fills with 10,000
registered hosts (`sim*`) and the VMs, running on them; then a fresh vimd (API on plain HTTP on
loopback, its embedded NATS) measures the 0-host cell (the hosts' rows are there, silent), then
the 10,000-host cell: `hb_load` makes every host start beating at once (a data-centre power-on,
each host reporting its VMs), the API load starts 15 s later (the load lasts 45 s), and the heartbeat misses are
counted from the first beat, beside the beats hb_load itself sent 1.5 s or more after the host's
one before (the load generator falling behind: a miss vimd rightly counts). vimd (and the nats-server it starts) run on CPU 1, the load
generators on CPU 0 (`taskset`), so the figures are the VIM's. PostgreSQL's server is not pinned.
"""
import json, os, signal, socket, statistics, subprocess, sys, tempfile, time

R = "target/release"
HOSTS = 10_000
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def as_postgres(sql):
    subprocess.run(["su", "postgres", "-c", f"psql -qc \"{sql}\""], check=True, stdout=subprocess.DEVNULL)


def ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return int(st[11]) + int(st[12])


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pinned(cpu, *cmd):
    return ["taskset", "-c", str(cpu), *cmd]


def run_json(cmd, log):
    """Runs a load generator; its last output line is its figures."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class Vimd:
    def __init__(self, backend, vms, log):
        self.state = tempfile.mkdtemp(prefix="bench-vim-", dir="/var/tmp")
        if backend == "postgres":
            as_postgres("DROP DATABASE IF EXISTS vimbench")
            as_postgres("CREATE DATABASE vimbench OWNER vimtest")
            self.url = "postgres://vimtest:vimtest@127.0.0.1:5432/vimbench"
        else:
            self.url = f"sqlite:{self.state}/vim.db"
        t = time.monotonic()
        out = subprocess.run(pinned(0, f"{R}/examples/seed", self.url, str(HOSTS), str(vms)),
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"seed: {out.stderr}")
        log.write(f"{out.stdout.strip()} in {time.monotonic() - t:.1f} s\n")
        self.port, self.nport = free_port(), free_port()
        self.proc = subprocess.Popen(
            pinned(1, f"{R}/vimd", "--state-dir", self.state, "--listen", f"127.0.0.1:{self.port}",
                   "--nats-listen", f"127.0.0.1:{self.nport}", "--plain-http", "--heartbeat-ms", "1000",
                   "--database-url", self.url),
            stderr=open(f"{self.state}/vimd.log", "w"))
        # Up: its token written and its API answering (with 10,000 hosts, vimd first writes
        # their NATS users and starts nats-server with them).
        token = f"{self.state}/admin.token"
        t, end = time.monotonic(), time.monotonic() + 300
        while not (os.path.exists(token) and os.path.getsize(token) > 0 and self.answers()):
            if time.monotonic() > end or self.proc.poll() is not None:
                raise SystemExit(f"vimd did not come up: {open(f'{self.state}/vimd.log').read()[-2000:]}")
            time.sleep(0.2)
        log.write(f"vimd up in {time.monotonic() - t:.1f} s\n")
        open(f"{self.state}/kernel", "w").close()

    def answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def close(self, log):
        # vimd's warnings and errors go into the bench log: a cell whose writes fail says so.
        with open(f"{self.state}/vimd.log", errors="replace") as f:
            bad = [line for line in f if " WARN " in line or " ERROR " in line]
        log.write("".join(bad[:20]) + (f"... {len(bad) - 20} more\n" if len(bad) > 20 else ""))
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # vimd's nats-server outlives it (the hosts' leases depend on it): stopped by its pid file.
        try:
            os.kill(int(open(f"{self.state}/nats/nats.pid").read()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        subprocess.run(["rm", "-rf", self.state])


def cell(v, vms, hosts, clients, per, log):
    api = pinned(0, f"{R}/examples/api_load", f"http://127.0.0.1:{v.port}", f"{v.state}/admin.token",
                 str(clients), str(per), f"{v.state}/kernel", str(vms))
    hb = None
    if hosts:
        # Before the API load on their shared core: beats the generator sends late are misses
        # that vimd rightly counts, not vimd's.
        hb = subprocess.Popen(["nice", "-n", "-10"] + pinned(0, f"{R}/examples/hb_load", v.url, v.state, f"nats://127.0.0.1:{v.nport}",
                                     str(hosts), str(vms), "45"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(15)
    t0, c0 = time.monotonic(), ticks(v.proc.pid)
    figures = run_json(api, log)
    t1, c1 = time.monotonic(), ticks(v.proc.pid)
    figures["cpu_pct"] = 100.0 * (c1 - c0) / CLK / (t1 - t0)
    figures["rss_mib"] = status_kib(v.proc.pid, "VmRSS") / 1024
    figures["hwm_mib"] = status_kib(v.proc.pid, "VmHWM") / 1024
    figures["ps_timeout"] = figures["late_sends"] = 0
    if hb:
        out, _ = hb.communicate(timeout=120)
        log.write(out)
        if hb.returncode != 0:
            raise SystemExit(f"hb_load failed:\n{out}")
        hb_figures = json.loads(out.strip().splitlines()[-1])
        figures["ps_timeout"] = hb_figures["ps_timeout"]
        figures["late_sends"] = hb_figures["late_sends"]
    return figures


def spread(xs, fmt="{:.1f}"):
    if not xs:
        return "-"
    m = statistics.median(xs)
    return f"{fmt.format(m)} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main():
    args = [int(a) for a in sys.argv[1:4]]
    repeats, clients, per = args + [3, 8, 100][len(args):]
    backends = os.environ.get("BENCH_DBS", "sqlite postgres").split()
    sizes = [int(n) for n in os.environ.get("BENCH_VMS", "1000 100000").split()]
    log_path = os.environ.get("BENCH_LOG", "/tmp/bench-vim.log")
    results = {}
    with open(log_path, "w") as log:
        for backend in backends:
            for vms in sizes:
                for rep in range(repeats):
                    log.write(f"== {backend} {vms} VMs, repeat {rep + 1}\n")
                    print(f"{backend}, {vms} VMs, repeat {rep + 1}/{repeats}", file=sys.stderr)
                    v = Vimd(backend, vms, log)
                    try:
                        for hosts in (0, HOSTS):
                            f = cell(v, vms, hosts, clients, per, log)
                            log.write(json.dumps(f) + "\n")
                            log.flush()
                            results.setdefault((backend, vms, hosts), []).append(f)
                    finally:
                        v.close(log)
    print(f"\nscripts/bench-vim.sh {repeats} {clients} {per}: {clients} clients x {per} requests per kind; "
          f"median (min-max) of {repeats}; log {log_path}")
    print("| database | VMs | hosts | list p99 ms | list req/s | show p99 ms | show req/s | submit p99 ms "
          "| submit req/s | PS_Timeout | beats sent late | vimd CPU % | vimd RSS MiB |")
    print("| --- " * 13 + "|")
    for (backend, vms, hosts), fs in results.items():
        col = lambda op, k: [f[op][k] for f in fs if op in f]
        print(f"| {backend} | {vms:,} | {hosts:,} | {spread(col('list', 'p99_ms'))} | {spread(col('list', 'rps'), '{:.0f}')} "
              f"| {spread(col('show', 'p99_ms'))} | {spread(col('show', 'rps'), '{:.0f}')} "
              f"| {spread(col('submit', 'p99_ms'))} | {spread(col('submit', 'rps'), '{:.0f}')} "
              f"| {spread([f['ps_timeout'] for f in fs], '{:.0f}')} | {spread([f['late_sends'] for f in fs], '{:.0f}')} "
              f"| {spread([f['cpu_pct'] for f in fs], '{:.0f}')} "
              f"| {spread([f['rss_mib'] for f in fs], '{:.0f}')} |")
    print("\np50 ms (median of repeats): " + "; ".join(
        f"{b} {v:,}/{h:,}: list {statistics.median([f['list']['p50_ms'] for f in fs]):.1f}, "
        f"show {statistics.median([f['show']['p50_ms'] for f in fs]):.1f}, "
        f"submit {statistics.median([f['submit']['p50_ms'] for f in fs]):.1f}"
        for (b, v, h), fs in results.items()))


if __name__ == "__main__":
    main()
