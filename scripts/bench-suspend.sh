#!/usr/bin/env bash
# Suspend and resume benchmark (docs/suspend.md), through the VIM as a user drives it: a 1 GiB
# test guest that has written all of its memory (tg.mode=dirty over 1000 MiB, then still writing)
# on a two-host local fleet (bench-failover.sh's: agents in network namespaces, shared storage on
# tmpfs).
#   - suspend: `vimctl vm suspend` (the API call) until it returns with the job done;
#   - resume: `vimctl vm resume --no-wait` until the guest's next heartbeat on the other host
#     (it beats every 10 ms tick), the guest running again where it was.
# Median of RUNS (min-max). Targets: suspend <= 2 s for 1 GiB; resume <= 100 ms.
# Usage: bench-suspend.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
python3 -u - "$runs" <<'PY'
import os, re, statistics, sys, time
sys.path.insert(0, "scripts")
from benchfleet import Fleet, prepare

prepare()

runs = int(sys.argv[1])


def beats(text):
    return [int(n) for n in re.findall(r"tg: hb n=(\d+)", text)]


f = Fleet(("h1", "h2"), cmdline="tg.mode=dirty tg.dirty_mib=1000 tg.rate_mib=512 tg.hb_ms=10",
          prefix="bench-sr")
try:
    vm = f.ctl("vm", "create", "--name", "s", "--image", "tg", "--memory-mib", "1024", "--no-net").strip()
    # Until the guest has written its 1000 MiB once (at 512 MiB/s asked; slower if the host is).
    f.wait(lambda: re.search(r"dirtied_mib=(\d{4,})", f.console(vm)), t=120, what="1000 MiB written")
    sus, res, sizes = [], [], []
    for i in range(runs):
        t0 = time.monotonic()
        f.ctl("vm", "suspend", vm)
        sus.append(time.monotonic() - t0)
        state = f"{f.d}/vim/shared/vms/{vm}/suspended/memory.bin"

        sizes.append(os.stat(state).st_blocks * 512 >> 20)
        last = max(beats(f.console(vm)) or [0])
        t0 = time.monotonic()
        f.ctl("vm", "resume", vm, "--no-wait")
        f.wait(lambda: max(beats(f.console(vm)) or [0]) > last, t=60, what="a heartbeat after the resume")
        res.append(time.monotonic() - t0)
        assert f.readies(vm) == 1, "the guest booted again"
        time.sleep(1)
    ms = lambda xs: f"{statistics.median(xs) * 1000:8.0f} ms {min(xs) * 1000:6.0f}-{max(xs) * 1000:.0f}"
    print(f"1 GiB guest, {runs} runs, median (min-max); state written: {statistics.median(sizes)} MiB")
    print(f"suspend (API call -> job done)          {ms(sus)}   target <= 2000 ms")
    print(f"resume  (API call -> guest heartbeat)   {ms(res)}   target <= 100 ms")
finally:
    f.close()
PY
