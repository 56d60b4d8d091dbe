"""VM blackout across a host live update, by guest memory size (zero copy: flat).

Run: .venv/bin/python bench/bench_vm.py [--runs 5] [--generation 6.19]

One machine per row, all of the same size (the largest VM + 2 GiB: what grows with machine
RAM -- page metadata, the sanitizer's walk -- is then the same in every row, and only the
guest's size changes), one VM (TCG), luod; --runs updates in a row, medians reported.
Blackout is the host clock from the guest's last exit before the pause to its first entry
after the resume (the guest's own TSC agrees within 50 ms + 2 %: scenario/witness.py);
total is luod's start of the update to every client back (FINISH). The floor is the same
with a 4 MiB guest -- a kernel, luod and a VMM starting with essentially nothing to restore
-- and blackout / floor is the cost of guest memory size (target <= 1.5; 8 GiB within 15 %
of 256 MiB).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from rich.console import Console
from rich.table import Table

from liveupdate.scenario.demo import Demo
from liveupdate.scenario.report import UpdateResult

MiB, GiB = 1 << 20, 1 << 30


SIZES = (256 * MiB, 1 * GiB, 4 * GiB, 8 * GiB)
MACHINE = max(SIZES) + 2 * GiB


def measure(vm_memory: int, runs: int, generation: str, hugepages: str = "", vms: int = 1,
            machine: int = MACHINE, accel: str = "tcg") -> dict[str, Any]:
    """Medians over ``runs`` updates of one machine; with several VMs, each run's figure is
    the largest of its VMs' (by the host clock, and by their own TSC). ``samples``: each
    run's figure (guest TSC where every VM has one, else host clock), in order."""
    with tempfile.TemporaryDirectory() as d:
        demo = Demo(d + "/m", vms, vm_memory, machine, generation, accel, False,
                    lambda msg: None, hugepages=hugepages)
        results: list[UpdateResult] = []
        try:
            demo.boot()
            results = [demo.update(n + 1, "none") for n in range(runs)]
        finally:
            demo.close()
    per_run = [list(r.vms.values()) for r in results]
    if not all(v.integrity and v.resumed and v.zero_copy_problem == ""
               for run in per_run for v in run):
        raise SystemExit(f"integrity or zero copy lost at {vm_memory >> 20} MiB")
    tl = [r.timeline for r in results]
    guest = [max(v.blackout_guest_s for v in run) for run in per_run
             if all(v.blackout_guest_s is not None for v in run)]
    return {"blackout": statistics.median(max(v.blackout_host_s or 0.0 for v in run)
                                          for run in per_run),
            "guest": statistics.median(guest) if guest else None,  # type: ignore[type-var]
            "total": statistics.median(t["normal"] - t["start"] for t in tl),
            "kexec": statistics.median(t["updated"] - t["reboot"] for t in tl),
            "samples": guest or [max(v.blackout_host_s or 0.0 for v in run)
                                 for run in per_run]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--generation", choices=("v3", "6.19", "7.0", "7.1", "7.2", "7.3",
                                             "7.3+posted"), default="6.19")
    ap.add_argument("--hugepages", choices=("", "2M", "1G"), default="",
                    help="guests on hugetlb pages (7.3+posted); the floor stays 4 KiB-based")
    args = ap.parse_args()
    floor = measure(4 * MiB, args.runs, args.generation)
    table = Table(title=f"VM blackout across a live update (LUO {args.generation}, TCG, "
                        f"{args.hugepages or '4K-based'} pages, "
                        f"{MACHINE >> 30} GiB machine, median of {args.runs})")
    for col in ("guest memory", "blackout s (host)", "blackout s (guest TSC)",
                "kexec+boot+luod s", "total s", "blackout / floor", "vs 256 MiB"):
        table.add_column(col, justify="right")
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    fb = floor["blackout"]
    assert fb is not None
    table.add_row("4 MiB (floor)", s(fb), s(floor["guest"]), s(floor["kexec"]),
                  s(floor["total"]), "1.00", "")
    base = None
    for size in SIZES:
        r = measure(size, args.runs, args.generation, args.hugepages)
        b = r["blackout"]
        assert b is not None
        base = base or b
        table.add_row(f"{size >> 20:,} MiB", s(b), s(r["guest"]), s(r["kexec"]),
                      s(r["total"]), f"{b / fb:.2f}", f"{b / base:.2f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
