"""Our VM blackout across a host live update beside QEMU 7.2's, same guest sizes, same run.

Run: .venv/bin/python bench/bench_qemu.py [--runs 5] [--sizes 256M,1G,4G,8G]

Ours (:mod:`bench_vm`'s measurement): a ``7.3+posted`` machine of the largest size + 4 GiB
(the same for every row), one VM under TCG walking all of its memory, ``--runs`` live updates
in a row; the guest's memory on 4 KiB-based shmem folios (THP within_size: 2 MiB where they
fit), on 2 MiB hugetlb pages or on 1 GiB hugetlb pages (``--vm-hugepages``). Blackout is the
guest's own TSC across the pause (the host clock where it is missing). Then two VMs of 4 GiB
on hugetlb pages, under TCG and under KVM where it is usable: the largest of their blackouts.

QEMU's (:mod:`qemu_peer`): Debian's ``qemu-system-x86`` under TCG with a guest walking all of
its memory, stopped and resumed by a new QEMU process -- copying save/restore through a file,
and restart in place on shared RAM (``/dev/shm``, ``share=on``, ``x-ignore-shared``) --
from ``stop`` to ``cont``, the new process's start included. The copy is left out above
``--copy-max`` (its peak holds the guest twice in RAM, plus the file). Skipped, with the
reason, where QEMU is not installed.

Ours runs first at every size, then QEMU's cells (see ``main``). Columns: each figure (s,
median of ``--runs``; ``--samples`` prints each cell's runs), ``copy / ours`` and
``ours / in-place`` (ours = the 1 GiB-page guest; the targets are >= 40 and <= 2.5 at 4 GiB),
and each page size's scale against its own first row -- 256 MiB, or 1 GiB for 1 GiB pages
(flat: zero copy; the target for hugetlb guests is <= 1.10 at 8 GiB; 4 KiB-based folios grow
with size by design).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from rich.console import Console
from rich.table import Table

from bench_vm import measure
from liveupdate.cli.common import SizeParam
from liveupdate.errors import LiveUpdateError
from liveupdate.vmm import kvm
from qemu_peer import blackout, unavailable, version

GiB = 1 << 30
GEN = "7.3+posted"
PAGES = ("", "2M", "1G")


SAMPLES = False  # --samples: each cell's runs, on stderr


def ours(size: int, hugepages: str, runs: int, machine: int, vms: int = 1,
         accel: str = "tcg") -> float:
    if hugepages == "1G" and size % GiB:
        return float("nan")
    try:
        r = measure(size, runs, GEN, hugepages, vms, machine, accel)
    except (LiveUpdateError, SystemExit) as e:  # one row's failure costs its cell, said so
        print(f"ours {size >> 20} MiB {hugepages or '4K'} x{vms}: failed: {e}", file=sys.stderr)
        return float("nan")
    figure = r["guest"] if r["guest"] is not None else r["blackout"]
    assert figure is not None
    if SAMPLES:
        print(f"ours {size >> 20} MiB {hugepages or '4K'} x{vms} {accel}: "
              + " ".join(f"{v:.3f}" for v in r["samples"]), file=sys.stderr)
    return figure


def qemu(size: int, mode: str, runs: int) -> float:
    samples = [blackout(size, mode) for _ in range(runs)]
    if SAMPLES:
        print(f"QEMU {size >> 20} MiB {mode}: " + " ".join(f"{v:.3f}" for v in samples),
              file=sys.stderr)
    return statistics.median(samples)


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="256M,1G,4G,8G")
    ap.add_argument("--copy-max", default="4G")
    ap.add_argument("--no-pair", action="store_true", help="skip the two 4 GiB VMs row")
    ap.add_argument("--samples", action="store_true",
                    help="print every cell's runs, in order, on stderr (its spread)")
    args = ap.parse_args()
    global SAMPLES
    SAMPLES = args.samples
    parse = SizeParam().convert
    sizes = [parse(s, None, None) for s in args.sizes.split(",")]
    copy_max = parse(args.copy_max, None, None)
    machine = max(sizes) + 4 * GiB  # room for the 1 GiB pool: aligned gigabytes, no scratch
    why = unavailable()
    peer = "absent" if why else version()
    if why:
        print(f"QEMU columns skipped: {why}", file=sys.stderr)
    # ours for every size first, then the peers: a peer's cell allocates and frees up to
    # 12 GiB (the copy at 4 GiB), and the cells right after one ran 10-25 % slower here (a
    # Firecracker guest with free page reporting) -- interleaved, that fell on the larger
    # rows only and skewed each scale line
    mine = {size: {p: ours(size, p, args.runs, machine) for p in PAGES} for size in sizes}
    rows = []
    for size in sizes:
        inplace = None if why else qemu(size, "inplace", args.runs)
        copy = None if why or size > copy_max else qemu(size, "copy", args.runs)
        rows.append((size, mine[size], inplace, copy))
    # each page size against its first row (a 1 GiB-page guest starts at 1 GiB)
    base = {p: next((r[1][p] for r in rows if r[1][p] == r[1][p]), float("nan"))
            for p in PAGES}
    t = Table(title=f"VM blackout: ours (LUO {GEN}, TCG, {machine >> 30} GiB machine) vs "
                    f"QEMU {peer} (TCG), same run, median of {args.runs}")
    for col in ("guest memory", "ours 4K s", "ours 2M s", "ours 1G s", "QEMU in-place s",
                "QEMU copy s", "copy / ours", "ours / in-place", "scale 4K", "scale 2M",
                "scale 1G"):
        t.add_column(col, justify="right")
    for size, mine, inplace, copy in rows:
        one_g = mine["1G"]
        t.add_row(f"{size >> 20:,} MiB", *(fmt(mine[p]) for p in PAGES), fmt(inplace),
                  fmt(copy), fmt(None if copy is None else copy / one_g, 1),
                  fmt(None if inplace is None else one_g / inplace, 2),
                  *(fmt(mine[p] / base[p], 2) for p in PAGES))
    Console(width=200).print(t)
    if not args.no_pair:
        pair = Table(title=f"Two VMs of 4 GiB on hugetlb pages (LUO {GEN}, 12 GiB "
                           f"machine): the largest blackout, median of {args.runs}")
        for col in ("accel", "pages", "blackout s (guest TSC)", "target"):
            pair.add_column(col, justify="right")
        kvm_why = kvm.unusable()
        for accel in ("tcg", "kvm"):
            for p in ("2M", "1G"):
                got = f"- ({kvm_why})" if accel == "kvm" and kvm_why else \
                    fmt(ours(4 * GiB, p, args.runs, 12 * GiB, vms=2, accel=accel))
                pair.add_row(accel, p, got, "<= 0.150")
        Console(width=200).print(pair)


if __name__ == "__main__":
    main()
