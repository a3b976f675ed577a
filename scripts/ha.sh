#!/usr/bin/env bash
# A highly available VIM on this machine (docs/ha.md): PostgreSQL (Debian's cluster, database
# `vimha`), a 3-node NATS JetStream cluster and two vimd sharing them; one leads, the other takes
# over when it dies. Everything listens on loopback; state under DIR; `start` makes the database
# afresh.
#
#   scripts/ha.sh start DIR     # prints how to reach each vimd
#   scripts/ha.sh stop DIR      # stops what start started (by the pids it recorded)
#
# Hosts are added through either vimd (`vimctl host add`); after that, reload the NATS nodes
# (`scripts/ha.sh reload DIR`), as an operator's tooling would when vimd rewrites the accounts
# file the nodes include.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: scripts/ha.sh start|stop|reload DIR" >&2; exit 2; }
pids="$dir/pids"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

case "$cmd" in
stop)
    [ -f "$pids" ] || { echo "ha: nothing started in $dir" >&2; exit 0; }
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$pids"
    rm -f "$pids"
    echo "ha: stopped"
    exit 0
    ;;
reload)
    grep '^nats ' "$dir/nodes" | while read -r _ pid; do kill -HUP "$pid"; done
    exit 0
    ;;
start) ;;
*) echo "usage: scripts/ha.sh start|stop|reload DIR" >&2; exit 2 ;;
esac

[ ! -f "$pids" ] || { echo "ha: already started in $dir (scripts/ha.sh stop $dir)" >&2; exit 1; }
scripts/setup.sh
cargo build -q -p vim
mkdir -p "$dir/nats"
: > "$pids"
: > "$dir/nodes"

# PostgreSQL: the test role, a database of its own.
scripts/postgres-test-db.sh
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sudo -u postgres sh -c "$1"; fi; }
# A fresh database each start: its first vimd writes the admin token into DIR.
as_pg "psql -qc 'drop database if exists vimha'"
as_pg "psql -qc 'create database vimha owner vimtest'"
db="postgres://vimtest:vimtest@127.0.0.1:5432/vimha"

# Three NATS nodes: clients on loopback ports, routes between them, the accounts file vimd writes.
ports=() routes=()
for i in 0 1 2; do ports+=("$(port)"); routes+=("$(port)"); done
for i in 0 1 2; do
    others=""
    for j in 0 1 2; do
        [ "$j" = "$i" ] || others="$others\"nats-route://127.0.0.1:${routes[$j]}\", "
    done
    cat > "$dir/nats/n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:${ports[$i]}"
jetstream { store_dir: "$dir/nats/n$i" }
cluster { name: vimha, listen: "127.0.0.1:${routes[$i]}", routes: [${others%, }] }
include "accounts.conf"
CONF
done
nats_url="nats://127.0.0.1:${ports[0]},nats://127.0.0.1:${ports[1]},nats://127.0.0.1:${ports[2]}"
password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '{"user": "vimd", "password": "%s"}\n' "$password" > "$dir/vimd-nats.json"
chmod 600 "$dir/vimd-nats.json"

start_vimd() { # N
    local n=$1 api
    api=$(port)
    target/debug/vimd --state-dir "$dir/vim$n" --listen "127.0.0.1:$api" --database-url "$db" \
        --nats-url "$nats_url" --nats-credentials "$dir/vimd-nats.json" \
        --nats-accounts-file "$dir/nats/accounts.conf" --replicas 3 \
        --shared-dir "$dir/shared" >"$dir/vimd$n.log" 2>&1 &
    echo $! >> "$pids"
    echo "$api" > "$dir/vim$n.port"
}

# The first vimd writes the accounts file, then waits for the nodes.
start_vimd 1
for _ in $(seq 100); do [ -f "$dir/nats/accounts.conf" ] && break; sleep 0.1; done
[ -f "$dir/nats/accounts.conf" ] || { echo "ha: vimd wrote no accounts file; see $dir/vimd1.log" >&2; exit 1; }
for i in 0 1 2; do
    nats-server -c "$dir/nats/n$i.conf" >"$dir/nats/n$i.log" 2>&1 &
    echo $! >> "$pids"
    echo "nats $!" >> "$dir/nodes"
done
for _ in $(seq 300); do [ -s "$dir/vim1/admin.token" ] && break; sleep 0.1; done
[ -s "$dir/vim1/admin.token" ] || { echo "ha: the first vimd did not start; see $dir/vimd1.log" >&2; exit 1; }
# The second shares the first's CA (so one vimctl --ca trusts both) and the database's tokens.
mkdir -p "$dir/vim2/tls"
chmod 700 "$dir/vim2" "$dir/vim2/tls"
cp "$dir/vim1/tls/ca.pem" "$dir/vim1/tls/ca.key" "$dir/vim2/tls/"
start_vimd 2
for n in 1 2; do
    p=$(cat "$dir/vim$n.port")
    for _ in $(seq 300); do
        curl -sf --cacert "$dir/vim1/tls/ca.pem" -H "authorization: Bearer $(cat "$dir/vim1/admin.token")" \
            "https://127.0.0.1:$p/cluster/status" >/dev/null 2>&1 && break
        sleep 0.1
    done
done
sleep 2
echo "ha: PostgreSQL $db; NATS $nats_url"
for n in 1 2; do
    p=$(cat "$dir/vim$n.port")
    s=$(curl -sf --cacert "$dir/vim1/tls/ca.pem" -H "authorization: Bearer $(cat "$dir/vim1/admin.token")" \
        "https://127.0.0.1:$p/cluster/status" || echo '{}')
    echo "ha: vimd $n at https://127.0.0.1:$p $s (log $dir/vimd$n.log)"
done
echo "ha: VIM_API=https://127.0.0.1:\$(cat $dir/vim1.port) VIM_CA=$dir/vim1/tls/ca.pem VIM_TOKEN_FILE=$dir/vim1/admin.token vimctl hosts"
echo "ha: stop with scripts/ha.sh stop $dir"
