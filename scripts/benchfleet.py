"""A local fleet for the benchmark scripts (bench-failover.sh, bench-suspend.sh): the release
binaries, run as an operator would, torn down completely by close()."""
import json, os, shutil, signal, subprocess, tempfile, time

B = os.path.abspath("target/release")
guest = os.path.abspath("images/out/testguest.elf")


def prepare():
    """What every fleet benchmark needs first, idempotently: the packages, the release binaries,
    the guest images."""
    subprocess.run(["scripts/setup.sh"], check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "vmm", "-p", "vim", "-p", "vim-agent"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["images/build.sh"], check=True, stdout=subprocess.DEVNULL)


def ip(*a):
    subprocess.run(["ip", *a], check=True)


class Fleet:
    """vimd and its NATS on this machine, one agent per host in a network namespace of its own
    (NATS over a veth), state and shared storage on tmpfs, and image `tg`, the test guest with
    `cmdline` and a 1 MiB disk."""

    def __init__(self, hosts, vimd_args=(), cmdline="tg.mode=hold tg.hb_ms=500", prefix="bench",
                 heartbeat_ms=1000, lease_ms=2000):
        self.heartbeat_ms, self.lease_ms = heartbeat_ms, lease_ms
        self.procs, self.agents, self.nets = [], {}, {}
        self.d = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/dev/shm")
        try:
            self._start(hosts, vimd_args, cmdline)
        except BaseException:
            # A fleet that did not come up leaves nothing behind either.
            self.close()
            raise

    def _start(self, hosts, vimd_args, cmdline):
        self.hosts = hosts
        # Names of its own: a second fleet of the same process must not meet the first's links
        # while the kernel still tears them down.
        Fleet.made = getattr(Fleet, "made", 0) + 1
        self.tag = f"{os.getpid() % 1000}{Fleet.made % 10}"

        port = 47800 + os.getpid() % 150
        self.nats_port = port + 1
        self.env = dict(os.environ, VIM_API=f"https://127.0.0.1:{port}", VIM_TOKEN_FILE=f"{self.d}/vim/admin.token",
                        VIM_CA=f"{self.d}/vim/tls/ca.pem")
        for i, h in enumerate(hosts):
            ns, veth, peer = f"bfo{self.tag}{h}", f"bfr{self.tag}{i}", f"bfh{self.tag}{i}"
            k = 100 + i
            ip("netns", "add", ns)
            # Recorded at once: close() removes what was made, however far this got.
            self.nets[h] = (ns, veth, f"10.232.{k}.1")
            ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("addr", "add", f"10.232.{k}.1/30", "dev", veth)
            ip("link", "set", veth, "up")
            ip("-n", ns, "addr", "add", f"10.232.{k}.2/30", "dev", peer)
            ip("-n", ns, "link", "set", peer, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        args = [f"{B}/vimd", "--state-dir", f"{self.d}/vim", "--listen", f"127.0.0.1:{port}",
                "--nats-listen", f"0.0.0.0:{self.nats_port}", "--heartbeat-ms", str(self.heartbeat_ms),
                "--misses", "3", "--lease-ms", str(self.lease_ms), *vimd_args]
        for (_, _, rip) in self.nets.values():
            args += ["--tls-name", rip]
        self.procs.append(subprocess.Popen(args, stderr=open(f"{self.d}/vimd.log", "w")))
        self.wait(lambda: os.path.exists(self.env["VIM_TOKEN_FILE"]) and self.ctl("hosts", check=False) is not None)
        for h in hosts:
            self.ctl("host", "add", h, "--json")
            self.start_agent(h)
        self.wait(lambda: self.ctl("hosts").count("reachable") == len(hosts))
        disk = f"{self.d}/disk.img"
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        self.ctl("image", "add", "tg", "--kernel", guest, "--disk", disk, "--cmdline", cmdline, "--json")
    def start_agent(self, h):
        ns, _, rip = self.nets[h]
        # netns-exec.sh: `ip netns exec` with the cgroup hierarchies mounted again inside (the
        # agent gives each VMM a cgroup; plain `ip netns exec` hides them and the agent refuses).
        self.agents[h] = subprocess.Popen(
            ["integration/netns-exec.sh", ns, f"{B}/vim-agent", "--host-id", h, "--nats-url", f"nats://{rip}:{self.nats_port}",
             "--credentials", f"{self.d}/vim/hosts/{h}.creds", "--nats-ca", self.env["VIM_CA"],
             "--state-dir", f"{self.d}/agent-{h}", "--shared-dir", f"{self.d}/vim/shared", "--vmm", f"{B}/vmm",
             "--heartbeat-ms", str(self.heartbeat_ms), "--bridge", f"bfb{self.tag}"],
            stderr=open(f"{self.d}/agent-{h}.log", "a"))
    def ctl(self, *args, check=True):
        r = subprocess.run([f"{B}/vimctl", *args], capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            if check:
                raise SystemExit(f"vimctl {' '.join(args)}: {r.stderr}")
            return None
        return r.stdout
    def wait(self, f, t=60, what="the fleet"):
        end = time.monotonic() + t
        while not f():
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.05)
    def vms(self):
        return json.loads(self.ctl("vm", "list", "--json"))
    def console(self, vm):
        try:
            return open(f"{self.d}/vim/shared/vms/{vm}/console.log", errors="replace").read()
        except OSError:
            return ""
    def readies(self, vm):
        return self.console(vm).count("tg: ready")
    def vmm_pids(self, host):
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if cmd.split("\0")[0].endswith("/vmm") and f"{self.d}/agent-{host}/" in cmd:
                out.append(int(pid))
        return out
    def create_on(self, host, creates):
        """Runs each `vimctl vm create` argument list with every other host draining, so the
        VMs land on `host`; their ids."""
        others = [h for h in self.hosts if h != host]
        for h in others:
            self.ctl("host", "drain", h, "--json")
        ids = [self.ctl(*args).strip() for args in creates]
        for h in others:
            self.ctl("host", "undrain", h)
        return ids
    def crash(self, host):
        """The host fails as a power loss would: its agent and every VMM SIGKILLed at once."""
        self.agents[host].send_signal(signal.SIGKILL)
        for p in self.vmm_pids(host):
            os.kill(p, signal.SIGKILL)
        self.agents[host].wait()
    def clear(self, ids):
        """After a failure: every host back, then the VMs `ids` deleted and their VMMs gone."""
        self.wait(lambda: "unreachable" not in self.ctl("hosts"), what="every host back")
        for v in ids:
            self.ctl("vm", "delete", v, "--no-wait")
        self.wait(lambda: not self.vms(), what="the VMs deleted")
        self.wait(lambda: not any(self.vmm_pids(h) for h in self.hosts), what="every VMM gone")
    def close(self):
        keep = os.environ.get("BENCH_KEEP")  # a directory: the logs are copied there first
        for a in self.agents.values():
            a.kill(); a.wait()
        for p in self.procs:
            p.terminate(); p.wait()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if self.d in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                    os.kill(int(pid), 9)
            except OSError:
                pass
        for (ns, veth, _) in self.nets.values():
            # The veth first: deleting it takes its peer at once (a namespace's links go later).
            subprocess.run(["ip", "link", "del", veth], stderr=subprocess.DEVNULL)
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        if keep:
            for root, _, files in os.walk(self.d):
                for name in files:
                    if name.endswith(".log"):
                        src = os.path.join(root, name)
                        dst = os.path.join(keep, os.path.relpath(src, self.d))
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        shutil.copy(src, dst)
        shutil.rmtree(self.d, ignore_errors=True)
