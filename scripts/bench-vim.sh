#!/usr/bin/env bash
# The VIM's benchmark matrix (issue 17): API p50/p99 and throughput for list (`GET /vms`, a
# consumer's 200 VMs), show (`GET /vms/ID`) and submit (`POST /vms`) at {0, 10,000} heartbeating
# hosts x {1,000, 100,000} VMs, heartbeat misses (PS_Timeout from the hosts' first beat), vimd's
# CPU and RSS, on SQLite and on PostgreSQL; every cell repeated, reported as median (min-max).
# vimd runs on CPU 1, the load generators (vim/examples: seed, hb_load, api_load) on CPU 0.
# How a cell is run: scripts/benchvim.py.
# Usage: bench-vim.sh [REPEATS=3] [CLIENTS=8] [REQUESTS_PER_CLIENT_AND_KIND=100]
#   BENCH_DBS="sqlite postgres", BENCH_VMS="1000 100000": a part of the matrix.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/postgres-test-db.sh
cargo build --release -p vim --bins --examples >/dev/null 2>&1
exec python3 scripts/benchvim.py "$@"
