#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer, nightly) of what a guest, a client or a host
# can feed us: vmm/fuzz/fuzz_targets/ (virtio-blk's queue handling; that of rng, balloon, mem, net
# and vsock; the snapshot state decoder; the VMM API request parser; the queue's protobuf
# messages). Each target starts from its seed
# corpus in vmm/fuzz/seeds/ (crashes found once are kept there: each run replays them) and runs
# SECONDS (default 20); a crash fails the script and leaves its input in
# target/fuzz-artifacts/TARGET/. Prints each target's executions and coverage.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(api_request snapshot_state proto_decode virtio_block virtio_devices)
version=0.13.2
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! cargo fuzz --version 2>/dev/null | grep -q "$version"; then
    cargo install cargo-fuzz --locked --version "$version"
fi
cd vmm/fuzz
cargo +nightly fuzz build -O "${targets[@]:0:0}" >/dev/null
status=0
for t in "${targets[@]}"; do
    corpus=$(mktemp -d /tmp/fuzz-corpus.XXXXXX)
    artifacts=../../target/fuzz-artifacts/$t
    mkdir -p "$artifacts"
    cp -r seeds/$t/. "$corpus/" 2>/dev/null || true
    log=$(mktemp /tmp/fuzz-log.XXXXXX)
    if cargo +nightly fuzz run -O "$t" "$corpus" -- -max_total_time="$secs" -max_len=32768 \
        -rss_limit_mb=2048 -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1; then
        done_line=$(grep -E '#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1)
        echo "fuzz $t: ok in ${secs}s: ${done_line}"
    else
        echo "fuzz $t: FAILED; the input is in target/fuzz-artifacts/$t/:" >&2
        grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$log" | head -n 20 >&2 || tail -n 40 "$log" >&2
        status=1
    fi
    rm -rf "$corpus" "$log"
done
exit $status
