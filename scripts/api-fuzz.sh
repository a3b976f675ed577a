#!/usr/bin/env bash
# Property-based tests of vimd's REST API against its own /openapi.json (Schemathesis): every
# operation, with schema-valid and schema-violating requests, with and without a token; responses
# must be documented, never 5xx, and what the schema forbids must be refused. A fresh vimd on
# loopback (plain HTTP, its own NATS and SQLite), killed by pid at the end.
# Usage: api-fuzz.sh [MAX_EXAMPLES]   (needs python3-venv: scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-10}
venv=target/schemathesis-venv
version=4.32.5
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "schemathesis==$version"
fi
cargo build -q -p vim --bin vimd
state=$(mktemp -d /tmp/api-fuzz.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Unauthenticated requests are part of the test: the failed-login limiter would answer them 429.
target/debug/vimd --state-dir "$state" --listen "127.0.0.1:$port" --nats-listen "127.0.0.1:$nport" \
    --plain-http --failed-logins-per-minute 1000000 2>"$state/vimd.log" &
pid=$!
# vimd's nats-server outlives it (the hosts' leases depend on it): stopped by its pid file.
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; kill $(cat "$state/nats/nats.pid" 2>/dev/null) 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/openapi.json" >/dev/null 2>&1 && [ -s "$state/admin.token" ] && break
    sleep 0.1
done
st=0
timeout 900 "$venv/bin/st" --no-color --config-file scripts/schemathesis.toml run \
    "http://127.0.0.1:$port/openapi.json" -H "Authorization: Bearer $(cat "$state/admin.token")" \
    --max-examples "$examples" --seed 1 || st=$?
if ! kill -0 $pid 2>/dev/null; then
    echo "api-fuzz: vimd died during the run:" >&2
    tail -n 30 "$state/vimd.log" >&2
    st=1
fi
exit $st
