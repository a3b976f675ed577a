#!/usr/bin/env bash
# Control-plane API benchmark: a local vimd (embedded NATS, SQLite) with no hosts; N clients
# issue `GET /vms` (a consumer listing its 200 VMs) and `POST /vms` (job submission: commit + publish;
# the jobs then fail placement, which is not measured), from vim/examples/api_load.rs (concurrent
# keep-alive clients). Prints throughput and p50/p99/max latency. The API is plain HTTP on loopback
# (--plain-http), as earlier figures were measured; NATS is TLS (the embedded server's only mode).
# Usage: bench-vim.sh [CLIENTS] [REQUESTS_PER_CLIENT]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-8}
per=${2:-250}
scripts/setup.sh
cargo build --release -p vim --bins --examples >/dev/null 2>&1
state=$(mktemp -d /tmp/bench-vim.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/vimd --state-dir "$state" --listen 127.0.0.1:$port --nats-listen 127.0.0.1:$nport \
    --plain-http --heartbeat-ms 1000 2>"$state/vimd.log" &
pid=$!
# vimd's nats-server outlives it (the hosts' leases depend on it): stopped by its pid file.
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; kill $(cat "$state/nats/nats.pid" 2>/dev/null) 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 100); do [ -s "$state/admin.token" ] && break; sleep 0.1; done
sleep 1
: > "$state/kernel"
api=(target/release/examples/api_load "http://127.0.0.1:$port" "$state/admin.token" "$clients" "$per" "$state/kernel")
echo "vimd: SQLite, embedded NATS, 2xx only (each request authenticated and audited)"
"${api[@]}"
# Heartbeat ingestion: simulated hosts beating at 1 Hz (a test-only fake, no agents or VMs).
for n in ${BENCH_HOSTS:-1000 3000 10000}; do
    target/release/examples/hb_load "$state" "nats://127.0.0.1:$nport" "$n" 15
done
# The API while 10,000 hosts heartbeat.
echo "API while 10000 simulated hosts heartbeat at 1 Hz:"
target/release/examples/hb_load "$state" "nats://127.0.0.1:$nport" 10000 25 &
load=$!
sleep 3
"${api[@]}"
wait $load
