"""LUO v3 live update with memfds: PREPARE, the kexec, and the restore in the next kernel.

Run: .venv/bin/python bench/bench_luo.py [--runs 5]

Each row is one machine (v3 image, sanitizer on) that goes through --runs update cycles: a
userspace program creates the memfds, allocates them fully (fallocate) and writes a marker in
each, registers them (FD_PRESERVE) and times SET_EVENT(PREPARE); the host times
``reboot(KEXEC)`` to the next kernel running; a program in the next kernel times FD_RESTORE
of every file plus FINISH, and checks every marker. Medians of the runs.

Scales: 1, 100 and 1000 memfds of 64 KiB (cost per file), and one memfd of 64 MiB vs 4 GiB
(zero copy: the bytes preserved must not matter). The baseline column is the 64 MiB row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from liveupdate.abi import image
from liveupdate.machine.client import MachineClient, start

GiB, MiB = 1 << 30, 1 << 20
CMDLINE = "kho=on liveupdate=on transparent_hugepage_shmem=within_size"
PRELUDE = r'''
import json, os, signal, sys, time
from liveupdate.abi import uapi
from liveupdate.client.syscall import Kernel
k = Kernel(); G = uapi.Gen.V3
def io(dev, name, **f):
    e = uapi.ioctl(G, name); b = bytearray(e.pack(**f)); k.ioctl(dev, e.number, b)
    return e.unpack(bytes(b))
dev = k.open("/dev/liveupdate")
'''
PRESERVE = r'''
n, size = int(sys.argv[1]), int(sys.argv[2])
for t in range(1, n + 1):
    fd = k.memfd_create(f"b{t}")
    k.fallocate(fd, 0, 0, size)
    k.pwrite(fd, t.to_bytes(8, "little"), 0)
    io(dev, "FD_PRESERVE", fd=fd, token=t)
    os.close(fd)
t0 = time.perf_counter()
io(dev, "SET_EVENT", event=0)
print(json.dumps({"prepare": time.perf_counter() - t0}), flush=True)
if os.fork():
    os._exit(0)
os.setsid(); [os.close(f) for f in (0, 1, 2)]; signal.pause()
'''
RESTORE = r'''
n = int(sys.argv[1])
t0 = time.perf_counter()
fds = [io(dev, "FD_RESTORE", token=t)["fd"] for t in range(1, n + 1)]
io(dev, "SET_EVENT", event=2)
elapsed = time.perf_counter() - t0
bad = [t for t, fd in zip(range(1, n + 1), fds) if k.pread(fd, 8, 0) != t.to_bytes(8, "little")]
print(json.dumps({"restore": elapsed, "bad": bad}))
'''


def _prog(m: MachineClient, body: str, *args: object) -> dict[str, float]:
    r = m.run([sys.executable, "-c", PRELUDE + body, *map(str, args)], timeout=600)
    if r["status"]:
        raise SystemExit(r["stderr"][-2000:])
    result: dict[str, float] = json.loads(r["stdout"].strip().splitlines()[-1])
    return result


def cycle(m: MachineClient, n: int, size: int) -> tuple[float, float, float]:
    prep = _prog(m, PRESERVE, n, size)["prepare"]
    m.kexec_load("images/v3.img")
    t = time.perf_counter()
    m.kexec_exec(300)
    jump = time.perf_counter() - t
    got = _prog(m, RESTORE, n)
    if got["bad"]:
        raise SystemExit(f"markers lost in files {got['bad']}")
    return prep, jump, got["restore"]


def row(n: int, size: int, memory: int, runs: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as d:
        images = Path(d) / "disk" / "images"
        images.mkdir(parents=True)
        (images / "v3.img").write_bytes(
            image.KernelImage(release="6.17.0-lu-v3", luo="v3").encode())
        proc, m = start(d, memory=memory, cmdline=CMDLINE, image="images/v3.img")
        try:
            m.booted(120)
            results = [cycle(m, n, size) for _ in range(runs)]
        finally:
            m.shutdown()
            proc.wait()
    prep, jump, rest = zip(*results, strict=True)
    return statistics.median(prep), statistics.median(jump), statistics.median(rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    table = Table(title=f"LUO v3 live update, median of {args.runs} cycles (sanitizer on)")
    for col in ("memfds", "size each", "preserved", "PREPARE s", "kexec s", "restore+FINISH s",
                "total s", "total / 64 MiB row"):
        table.add_column(col, justify="right")
    rows = [(1, 64 << 10, 2 * GiB), (100, 64 << 10, 2 * GiB), (1000, 64 << 10, 2 * GiB),
            (1, 64 * MiB, 6 * GiB), (1, 4 * GiB, 6 * GiB)]
    base = None
    for n, size, memory in rows:
        prep, jump, rest = row(n, size, memory, args.runs)
        total = prep + jump + rest
        if size == 64 * MiB:
            base = total
        ratio = f"{total / base:.2f}" if base and size >= 64 * MiB else ""
        table.add_row(str(n), f"{size >> 10:,} KiB", f"{n * size >> 20:,} MiB", f"{prep:.3f}",
                      f"{jump:.3f}", f"{rest:.3f}", f"{total:.3f}", ratio)
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
