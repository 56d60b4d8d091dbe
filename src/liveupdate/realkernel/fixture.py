"""A real capture, made small enough to keep in the repository, and made whole again.

A capture's RAM is hundreds of MiB, almost all of it the guest's own page cache and heap.
What an inspector of the handover reads is a few hundred pages: the ``SETUP_KEXEC_KHO``
payload's targets, the KHO FDT and its subtrees, the preserved-memory map, LUO's session
and file blocks, the memfd folio arrays -- and the preserved pages themselves. :func:`pack`
decodes the handover once (:mod:`liveupdate.tools.report`, recording every page it reads),
adds every preserved range, and keeps only those pages: ``ram.pages.xz`` (lzma) holds a JSON
index line ``{"ram_bytes", "extents": [[first_page, n_pages], ...]}`` and then the pages.
Everything else of RAM becomes zero; so do the ROM segment and the CPU notes' neighbours in
the ELF core, whose header, program headers and notes are kept byte for byte
(``elf-head.bin``: the file up to the first PT_LOAD's data; ``elf-tail.bin``: whatever QEMU
wrote after the last one, its section name table). :func:`unpack` writes
``ram.raw`` and ``ram.elf`` back, sparse, with the kept pages where QEMU had put them.
"""

from __future__ import annotations

import errno
import json
import lzma
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.tools import ramfile

PAGE = PAGE_SIZE
KEEP = ("setup_data.payload", "stage1.json", "stage2.json", "capture.json",
        "debugfs-stage1", "debugfs-stage2", "setup_data")


class RecordingPhysMem(PhysMem):
    """PhysMem that remembers every page it was asked for."""

    def __init__(self, buf: Any) -> None:
        super().__init__(buf)
        self.pages: set[int] = set()

    def read(self, phys: int, size: int, what: str = "read") -> bytes:
        if size > 0:
            self.pages.update(range(phys // PAGE, (phys + size - 1) // PAGE + 1))
        return super().read(phys, size, what)


def handover_pages(ram: Path, payload: bytes) -> set[int]:
    """Every page the handover's decoder reads, and every preserved page."""
    from liveupdate.tools import report

    with open(ram, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        mem = RecordingPhysMem(m)
        rep = report.describe(payload, mem)
        if report.errors(rep):
            raise LiveUpdateError(err=errno.EINVAL, msg="the capture does not decode: "
                                  + "; ".join(report.errors(rep)[:3]))
        pages = set(mem.pages)
        for start, end in rep["root"]["memory"]["ranges"]:
            pages.update(range(int(start, 16) // PAGE, (int(end, 16) + PAGE - 1) // PAGE))
    return pages


def _extents(pages: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def _loads(head: bytes, size: int) -> list[tuple[int, int, int]]:
    """(file offset, paddr, filesz) of every PT_LOAD of a QEMU core of ``size`` bytes whose
    headers are in ``head`` (checked as :func:`ramfile.parse_elf_core` checks any core)."""
    segs, _ = ramfile.parse_elf_core(head, size)
    return [(off, pa, n) for pa, n, off in segs]


def pack(capture: Path, dest: Path) -> dict[str, Any]:
    """Write the small form of ``capture`` to ``dest``; returns its index."""
    payload = (capture / "setup_data.payload").read_bytes()
    raw = capture / "ram.raw"
    pages = handover_pages(raw, payload)
    ext = _extents(pages)
    ram_bytes = raw.stat().st_size
    dest.mkdir(parents=True, exist_ok=True)
    elf_bytes = (capture / "ram.elf").stat().st_size
    index = {"ram_bytes": ram_bytes, "elf_bytes": elf_bytes, "extents": ext}
    fd = os.open(raw, os.O_RDONLY)
    try:
        with lzma.open(dest / "ram.pages.xz", "wb", preset=9) as out:
            out.write(json.dumps(index).encode() + b"\n")
            for first, n in ext:
                out.write(os.pread(fd, n * PAGE, first * PAGE))
    finally:
        os.close(fd)
    with open(capture / "ram.elf", "rb") as f:
        head = f.read(1 << 16)
        loads = _loads(head, elf_bytes)
        end = max(off + size for off, _, size in loads)
        f.seek(end)
        (dest / "elf-tail.bin").write_bytes(f.read(1 << 16))
    (dest / "elf-head.bin").write_bytes(head[:min(off for off, _, _ in loads)])
    for name in KEEP:
        src = capture / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    with open(capture / "console.log", "rb") as f, \
            lzma.open(dest / "console.log.xz", "wb") as out:
        out.write(f.read())
    return index


def unpack(fixture: Path, into: Path) -> tuple[Path, Path]:
    """``ram.raw`` and ``ram.elf`` rebuilt from ``fixture`` in ``into`` (sparse)."""
    into.mkdir(parents=True, exist_ok=True)
    raw, elf = into / "ram.raw", into / "ram.elf"
    head = (fixture / "elf-head.bin").read_bytes()
    with lzma.open(fixture / "ram.pages.xz", "rb") as src:
        index = json.loads(src.readline())
        loads = _loads(head, int(index["elf_bytes"]))
        rfd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        efd = os.open(elf, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(rfd, int(index["ram_bytes"]))
            end = max(off + size for off, _, size in loads)
            tail = (fixture / "elf-tail.bin").read_bytes()
            os.ftruncate(efd, end + len(tail))
            os.pwrite(efd, head, 0)
            os.pwrite(efd, tail, end)
            for first, n in index["extents"]:
                data = src.read(n * PAGE)
                if len(data) != n * PAGE:
                    raise LiveUpdateError(err=errno.EINVAL, msg=f"{fixture}: ram.pages.xz "
                                          "ends before its index says")
                phys = first * PAGE
                os.pwrite(rfd, data, phys)
                for off, pa, size in loads:
                    lo, hi = max(phys, pa), min(phys + len(data), pa + size)
                    if lo < hi:
                        os.pwrite(efd, data[lo - phys:hi - phys], off + lo - pa)
        finally:
            os.close(rfd)
            os.close(efd)
    return raw, elf

