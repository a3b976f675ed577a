#!/usr/bin/env bash
# Control-plane API benchmark: a local vimd (embedded NATS, SQLite) with no hosts; N client threads
# issue `GET /vms` (with 200 VMs in the database) and `POST /vms` (job submission: commit + publish;
# the jobs then fail placement, which is not measured). Prints throughput and p50/p99 latency.
# Usage: bench-vim.sh [THREADS] [REQUESTS_PER_THREAD]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-8}
per=${2:-250}
scripts/setup.sh
cargo build --release -p vim >/dev/null 2>&1
state=$(mktemp -d /tmp/bench-vim.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/vimd --state-dir "$state" --listen 127.0.0.1:$port --nats-listen 127.0.0.1:$nport \
    --heartbeat-ms 1000 2>"$state/vimd.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 100); do [ -s "$state/admin.token" ] && break; sleep 0.1; done
sleep 1
: > "$state/kernel"
cat > "$state/api.py" <<'PY'
import json, sys, threading, time, urllib.request, statistics
port, state, threads, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
token = open(f"{state}/admin.token").read().strip()
base = f"http://127.0.0.1:{port}"
def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        r.read()
    return time.perf_counter() - t
only_get = len(sys.argv) > 5
if not only_get:
    call("POST", "/images", {"name": "img", "kernel": f"{state}/kernel"})
    for i in range(200):
        call("POST", "/vms", {"name": f"seed{i}", "image": "img", "vcpus": 1, "memory_mib": 64})
def run(name, method, path, body):
    lat = []
    def worker(k):
        for i in range(per):
            b = dict(body, name=f"b{k}x{i}") if body else None
            lat.append(call(method, path, b))
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    el = time.perf_counter() - t0
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
    print(f"{name:14} {len(lat):6d} requests, {threads} threads: {len(lat)/el:8.0f} req/s  p50 {p(0.5):6.2f} ms  p99 {p(0.99):6.2f} ms")
if only_get:
    run("GET /vms", "GET", "/vms", None)
    run("POST /vms", "POST", "/vms", {"image": "img", "vcpus": 1, "memory_mib": 64})
    sys.exit(0)
print(f"vimd: SQLite, embedded NATS, 2xx only (each request audited)")
run("GET /vms", "GET", "/vms", None)
run("POST /vms", "POST", "/vms", {"image": "img", "vcpus": 1, "memory_mib": 64})
PY
python3 "$state/api.py" "$port" "$state" "$threads" "$per"
# Heartbeat ingestion: simulated hosts beating at 1 Hz (a test-only fake, no agents or VMs).
cargo build --release -p vim --example hb_load >/dev/null 2>&1
for n in ${BENCH_HOSTS:-1000 3000 10000}; do
    target/release/examples/hb_load "$state" "nats://127.0.0.1:$nport" "$n" 15
done
# The API while 10,000 hosts heartbeat.
echo "API while 10000 simulated hosts heartbeat at 1 Hz:"
target/release/examples/hb_load "$state" "nats://127.0.0.1:$nport" 10000 25 &
load=$!
sleep 3
python3 "$state/api.py" "$port" "$state" "$threads" "$per" under-load
wait $load
