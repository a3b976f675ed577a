#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, fast-lane tests on this machine's KVM, the
# API fuzzed against its OpenAPI document, and the nested lane (real Debian guests under our vmm inside a QEMU-emulated L1).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step's time, on stderr: where the suite's minutes go (its budget is 45).
step_start=$SECONDS
step() {
    echo "test.sh: ${step_name:-start} took $((SECONDS - step_start)) s (total $SECONDS s)" >&2
    step_name=$1
    step_start=$SECONDS
}
trap 'step end' EXIT
step setup
scripts/setup.sh
step "fmt and clippy"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
step "images, static vmm, packages"
images/build.sh
scripts/build-vmm.sh >/dev/null
# The Debian packages (cargo-deb): the package tests install them, the join test serves them.
scripts/package.sh
# PostgreSQL for the VIM's tests (they run on SQLite and on this): Debian's cluster, a test role
# and database on the local socket.
if [ -z "${VIM_TEST_DATABASE_URL:-}" ]; then
    scripts/postgres-test-db.sh
    export VIM_TEST_DATABASE_URL="postgres://vimtest:vimtest@127.0.0.1:5432/vimtest"
fi
step "cargo test --workspace"
cargo test --workspace
step "static vmm tests"
# The same snapshot, migration and checkpoint tests with the static vmm the package ships: a libc
# call that a static link leaves unresolved fails only there (copy_file_range's did).
VMM_TEST_BIN="$(scripts/build-vmm.sh)" cargo test -p vmm --test snapshot --test migrate --test checkpoint
# Coverage-guided fuzzing of what guests, clients and hosts feed us: 20 s per target.
step fuzz
scripts/fuzz.sh 20
step "api fuzz"
# vimd's REST API against its own OpenAPI document (Schemathesis).
scripts/api-fuzz.sh
