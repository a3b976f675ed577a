#!/usr/bin/env bash
# Starts Debian's PostgreSQL cluster if it is down and creates the role and database the VIM's
# tests use (vimtest/vimtest, on 127.0.0.1:5432). Idempotent.
set -euo pipefail
ver=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
name=$(pg_lsclusters -h | awk 'NR==1 {print $2}')
if [ -z "$ver" ]; then
    echo "postgres-test-db: no PostgreSQL cluster (scripts/setup.sh installs postgresql)" >&2
    exit 1
fi
if ! pg_lsclusters -h | awk 'NR==1 {print $4}' | grep -q online; then
    pg_ctlcluster "$ver" "$name" start
fi
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sudo -u postgres sh -c "$1"; fi; }
for i in $(seq 50); do as_pg "psql -qAtc 'select 1'" >/dev/null 2>&1 && break; sleep 0.2; done
as_pg "psql -qAtc \"select 1 from pg_roles where rolname='vimtest'\"" | grep -q 1 \
    || as_pg "psql -qc \"create role vimtest login password 'vimtest'\""
as_pg "psql -qAtc \"select 1 from pg_database where datname='vimtest'\"" | grep -q 1 \
    || as_pg "psql -qc 'create database vimtest owner vimtest'"
