"""Emulated machine benchmarks: cold boot, kexec round trip, KHO serialize + deserialize.

Run: .venv/bin/python bench/bench_machine.py [--runs 5]

* cold boot: power-on to a running kernel (a fresh kernel process each time), 4 and 16 GiB.
* kexec round trip: ``reboot(KEXEC)`` requested to the next kernel running, on a 16 GiB
  machine with 0, 1 GiB and 8 GiB preserved in 4 MiB folios by ``kho_bench``; only 64 MiB of
  it is ever written (fixed dirty footprint); sanitizer on. Zero copy means 8 GiB costs about
  what 1 GiB does.
* serialize + deserialize: ``kho_finalize`` of 1 Mi preserved order-0 pages and the next
  kernel's full handover validation (in-process, 8 GiB RAM).
* segment copy at the jump (``kexec.copy_segments``, machine_kexec's relocation) for kernel
  images of 32 and 512 MiB load size, against the sanitizer on the same 4 GiB machine: the
  copy writes the segments' data and punches the rest of ``memsz``, so it stays flat.
Medians of --runs runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from liveupdate.abi import bootparams, image
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import kexec
from liveupdate.kernel.kho.validate import validate_handover
from liveupdate.machine.client import start

GiB = 1 << 30


def cold_boot(memory: int, runs: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        proc, c = start(d, memory=memory, boot=False)
        times = []
        try:
            for _ in range(runs):
                t = time.perf_counter()
                c.power_on(memory=memory, cmdline="kho=on")
                c.booted(120)
                times.append(time.perf_counter() - t)
                c.power_off()
        finally:
            c.shutdown()
            proc.wait()
    return statistics.median(times)


def kexec_round_trip(preserved: int, runs: int) -> tuple[float, float, int]:
    # liveupdate=on: 6.19 finalizes the map inside reboot() only through LUO, so the timed
    # reboot includes the serialization
    cmdline = "kho=on liveupdate=on" + (f" kho_bench={preserved >> 20}M kho_bench_dirty=64M"
                                        if preserved else "")
    with tempfile.TemporaryDirectory() as d:
        proc, c = start(d, memory=16 * GiB, cmdline=cmdline)
        times, loads = [], []
        try:
            c.booted(120)
            for _ in range(runs):
                off = c.status()["console_bytes"]
                t = time.perf_counter()
                c.run([sys.executable, "-m", "liveupdate.userspace.kexec", "-l",
                       "images/default.img"])
                loads.append(time.perf_counter() - t)
                t = time.perf_counter()
                with contextlib.suppress(LiveUpdateError):  # EIO: the kernel went away
                    c.run([sys.executable, "-m", "liveupdate.userspace.kexec", "-e"])
                c.booted(120)
                times.append(time.perf_counter() - t)
                if preserved:
                    c.wait(r"kho_bench: restored (\d+)/\1 folios", offset=off, timeout=60)
            resident = c.status()["ram_resident"]
        finally:
            c.shutdown()
            proc.wait()
    return statistics.median(times), statistics.median(loads), resident


def serialize_deserialize(runs: int) -> tuple[float, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.kernel.conftest import Rig  # the in-process kernel on a real RAM memfd

    rig = Rig(8 * GiB)
    try:
        k = rig.boot("kho=on")
        kout = k.require_kho()
        blocks = np.array([k.alloc_pages(10) for _ in range(1024)], np.uint64)  # 4 GiB
        phys = (blocks[:, None] + np.arange(1024, dtype=np.uint64) * np.uint64(PAGE_SIZE)).ravel()
        kout.preserve_blocks(phys, np.zeros(len(phys), np.uint8))
        ser = []
        for _ in range(runs):
            t = time.perf_counter()
            kout.finalize()
            ser.append(time.perf_counter() - t)
        scratch_phys = k.alloc_pages(0)
        k.write(scratch_phys, kout.scratch.tobytes())
        kd = bootparams.KhoData(kout.root_phys, PAGE_SIZE, scratch_phys, kout.scratch.nbytes)
        de = []
        for _ in range(runs):
            t = time.perf_counter()
            kin = validate_handover(k, kd, (kout.format,), kout.core)
            de.append(time.perf_counter() - t)
        assert kin.preserved.pages() >= 1 << 20
        return statistics.median(ser), statistics.median(de)
    finally:
        rig.close()


def segment_copy(runs: int) -> list[tuple[int, int, float, float]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.kernel.conftest import Rig

    rows = []
    for load in (32 << 20, 512 << 20):
        rig = Rig(4 * GiB)
        try:
            k = rig.boot("kho=on kho_scratch=64M,1G,64M")
            kexec.file_load(k, image.KernelImage(load_size=load).encode(), "kho=on")
            copy, san = [], []
            for _ in range(runs):
                t = time.perf_counter()
                copied = kexec.copy_segments(k)
                copy.append(time.perf_counter() - t)
                t = time.perf_counter()
                kexec.sanitize(k)
                san.append(time.perf_counter() - t)
            rows.append((load, copied, statistics.median(copy), statistics.median(san)))
        finally:
            rig.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    con = Console(width=140)
    t = Table(title=f"cold boot, median of {args.runs}")
    for col in ("RAM", "power-on to running (s)"):
        t.add_column(col, justify="right")
    for mem in (4 * GiB, 16 * GiB):
        t.add_row(f"{mem // GiB} GiB", f"{cold_boot(mem, args.runs):.3f}")
    con.print(t)
    t = Table(title=f"kexec round trip, 16 GiB RAM, sanitizer on, 64 MiB dirty, median of "
                    f"{args.runs}")
    for col in ("preserved", "kexec_file_load (s)", "reboot -> running (s)",
                "vs 1 GiB", "host RSS of RAM (MiB)"):
        t.add_column(col, justify="right")
    rows = [(p, *kexec_round_trip(p, args.runs)) for p in (0, GiB, 8 * GiB)]
    base = rows[1][1]
    for p, trip, load, resident in rows:
        t.add_row(f"{p // GiB} GiB", f"{load:.3f}", f"{trip:.3f}", f"{trip / base:.2f}",
                  f"{resident >> 20}")
    con.print(t)
    ser, de = serialize_deserialize(args.runs)
    t = Table(title=f"KHO memory map, 1 Mi preserved order-0 pages, median of {args.runs}")
    for col in ("kho_finalize (s)", "validate + deserialize (s)", "total (s)"):
        t.add_column(col, justify="right")
    t.add_row(f"{ser:.3f}", f"{de:.3f}", f"{ser + de:.3f}")
    con.print(t)
    t = Table(title=f"segment copy at the jump, 4 GiB RAM, median of {args.runs}")
    for col in ("kernel load size", "bytes copied", "copy (ms)", "sanitizer (ms)",
                "copy / sanitizer"):
        t.add_column(col, justify="right")
    for load, copied, copy, san in segment_copy(args.runs):
        t.add_row(f"{load >> 20} MiB", f"{copied:,}", f"{copy * 1e3:.2f}", f"{san * 1e3:.1f}",
                  f"{copy / san:.3f}")
    con.print(t)


if __name__ == "__main__":
    main()
