"""Write QEMU-style ``dump-guest-memory`` ELF cores from raw RAM images, for tests.

The layout is QEMU's (dump/dump.c): ELF64 header, program headers (a ``PT_NOTE`` first, then
one ``PT_LOAD`` per RAM piece with ``p_paddr`` = guest physical address), the note, then the
segments' bytes back to back. RAM is split as a PC's is around the legacy hole (nothing at
0xa0000-0xc0000, the option ROMs and BIOS as their own blocks, RAM from 1 MiB). The core is
written sparse: only the raw image's data extents are copied.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
PC_SPLITS = [(0x0, 0xA0000), (0xC0000, 0x20000), (0xE0000, 0x20000)]  # (paddr, size)
NOTE = struct.pack("<III", 5, 336, 1) + b"CORE\0\0\0\0" + bytes(336)  # an NT_PRSTATUS


def pc_segments(ram_size: int) -> list[tuple[int, int]]:
    """``(paddr, size)`` of the RAM pieces QEMU dumps for a PC with ``ram_size`` bytes."""
    return [*PC_SPLITS, (0x100000, ram_size - 0x100000)]


def ehdr(phnum: int, *, machine: int = 62, e_type: int = 4, ident: bytes | None = None,
         shoff: int = 0, shnum: int = 0) -> bytes:
    ident = ident if ident is not None else b"\x7fELF\x02\x01\x01" + bytes(9)
    return EHDR.pack(ident, e_type, machine, 1, 0, EHDR.size, shoff, 0, EHDR.size, PHDR.size,
                     phnum, SHDR.size if shnum else 0, shnum, 0)


def write_core(raw: Path, out: Path, segments: list[tuple[int, int]] | None = None) -> list[
        tuple[int, int, int]]:
    """Write ``out`` from ``raw``; returns the ``(paddr, size, offset)`` of every PT_LOAD."""
    size = os.path.getsize(raw)
    segs = segments if segments is not None else pc_segments(size)
    phoff = EHDR.size
    note_off = phoff + PHDR.size * (1 + len(segs))
    off = (note_off + len(NOTE) + 4095) & ~4095
    loads = []
    for paddr, n in segs:
        loads.append((paddr, n, off))
        off += n
    head = ehdr(1 + len(segs))
    head += PHDR.pack(4, 0, note_off, 0, 0, len(NOTE), len(NOTE), 0)
    head += b"".join(PHDR.pack(1, 0, o, 0, p, n, n, 0) for p, n, o in loads)
    src = os.open(raw, os.O_RDONLY)
    dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(dst, off)
        os.pwrite(dst, head, 0)
        os.pwrite(dst, NOTE, note_off)
        for paddr, n, o in loads:
            _copy_extents(src, paddr, n, dst, o)
    finally:
        os.close(src)
        os.close(dst)
    return loads


def _copy_extents(src: int, start: int, n: int, dst: int, to: int) -> None:
    pos, end = start, start + n
    while pos < end:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError:
            return
        if data >= end:
            return
        hole = min(os.lseek(src, data, os.SEEK_HOLE), end)
        while data < hole:
            chunk = os.pread(src, min(hole - data, 8 << 20), data)
            os.pwrite(dst, chunk, to + data - start)
            data += len(chunk)
        pos = hole
