#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, fast-lane tests on this machine's KVM, and
# the nested lane (real Debian guests under our vmm inside a QEMU-emulated L1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
images/build.sh
cargo build --release -p vmm
cargo test --workspace
