"""Live-update cycles per minute: updates back to back, start to next start.

Run: .venv/bin/python bench/bench_cycles.py [--cycles 20] [--runs 3] [--vms 2]
     [--vm-memory 64M] [--generation 6.19]

One demo machine per row (two small VMs and the cache, luod; KVM when usable), booted, its
guests walked once; then --cycles updates in a row, each the whole cycle: luod loads the next
kernel (its kernel process and userspace spares ready before the load returns: the refill),
prepares, freezes, kexecs, and the next kernel's services restore until FINISH -- then at
once the next. A cycle is the time from one update's start (the load) to the next's. The
guests are judged once, after the last cycle, by the checker from RAM (every page against
the guest's own records), and the cache's keys read back: a cycle that lost anything fails
the run. Rows: spares on, spares off (``lu.spares=0``). Medians over --runs machines. Target
(issue #26): >= 120 cycles per minute with spares.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from liveupdate.scenario import host
from liveupdate.scenario.demo import Demo

MiB, GiB = 1 << 20, 1 << 30


def cycles(spares: bool, n: int, vms: int, vm_memory: int, generation: str
           ) -> tuple[list[float], list[float]]:
    """Cycle times (start to next start) and the largest VM blackout of each cycle."""
    with tempfile.TemporaryDirectory() as d:
        demo = Demo(d + "/m", vms, vm_memory, 4 * GiB, generation, "auto", True,
                    lambda msg: None, spares=spares)
        starts: list[float] = []
        blackouts: list[float] = []
        try:
            demo.boot()
            for i in range(1, n + 2):  # one more start: the last cycle's end
                starts.append(time.monotonic())
                if i > n:
                    break
                host.load(demo, f"images/{generation}.img", lambda msg: None)
                demo.kexec(lambda msg: None)  # until every VMM and the cache answer again
                host.outcome(demo, i, 120)
                blackouts.append(max(s["blackout"]["host_s"]
                                     for s in host.statuses(demo).values()))
            verdicts = demo.verdicts()
            cache = host.cache_result(demo)
        finally:
            demo.close()
    lost = [vm for vm, v in verdicts.items() if not v.intact]
    if lost or (cache is not None and not cache.intact):
        raise SystemExit(f"lost after {n} cycles: {lost or 'the cache'}")
    return [b - a for a, b in itertools.pairwise(starts)], blackouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vms", type=int, default=2)
    ap.add_argument("--vm-memory", type=int, default=64, help="MiB")
    ap.add_argument("--generation", default="6.19")
    args = ap.parse_args()
    t = Table(title=f"{args.cycles} live-update cycles in a row, {args.vms} VMs of "
                    f"{args.vm_memory} MiB and the cache, {args.generation}; median of "
                    f"{args.runs} machines")
    for col in ("userspace", "cycle s (median)", "cycles/min", "blackout s (median)"):
        t.add_column(col, justify="right")
    for spares in (True, False):
        per_min, cycle, black = [], [], []
        for _ in range(args.runs):
            c, b = cycles(spares, args.cycles, args.vms, args.vm_memory << 20,
                          args.generation)
            cycle.append(statistics.median(c))
            per_min.append(60 * len(c) / sum(c))
            black.append(statistics.median(b))
        t.add_row("spares" if spares else "no spares (lu.spares=0)",
                  f"{statistics.median(cycle):.3f}", f"{statistics.median(per_min):.0f}",
                  f"{statistics.median(black):.3f}")
    Console().print(t)


if __name__ == "__main__":
    main()
