"""Write QEMU ``dump-guest-memory`` ELF cores from raw RAM images, for tests.

The default layout is the one a real dump has (QEMU of Debian 13, a 512 MiB PC guest, read
with readelf in /work/realcap): ELF64 header with ``e_ehsize`` 8 (QEMU stores the size of a
pointer), two section headers (NULL, ``.shstrtab``) at 0x40, the program headers after them
-- a ``PT_NOTE`` first, one ``PT_LOAD`` of all low RAM from 0, one of the 256 KiB BIOS ROM at
0xfffc0000 -- then the note and the segments' bytes back to back at unaligned offsets.
``segments`` splits RAM otherwise (e.g. :data:`PC_SPLITS`, as older dumps and guests with
several RAM blocks have). The core is written sparse: only the image's data extents.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
BIOS = (0xFFFC0000, 0x40000)
PC_SPLITS = [(0x0, 0xA0000), (0xC0000, 0x20000), (0xE0000, 0x20000)]  # (paddr, size)
NOTE = struct.pack("<III", 5, 336, 1) + b"CORE\0\0\0\0" + bytes(336)  # an NT_PRSTATUS


def pc_segments(ram_size: int) -> list[tuple[int, int]]:
    """RAM split around the legacy hole, then everything from 1 MiB."""
    return [*PC_SPLITS, (0x100000, ram_size - 0x100000)]


def ehdr(phnum: int, *, machine: int = 62, e_type: int = 4, ident: bytes | None = None,
         phoff: int = EHDR.size, shoff: int = 0, shnum: int = 0, ehsize: int = 8) -> bytes:
    ident = ident if ident is not None else b"\x7fELF\x02\x01\x01" + bytes(9)
    return EHDR.pack(ident, e_type, machine, 1, 0, phoff, shoff, 0, ehsize, PHDR.size,
                     phnum, SHDR.size if shnum else 0, shnum, 1 if shnum > 1 else 0)


def write_core(raw: Path, out: Path, segments: list[tuple[int, int]] | None = None) -> list[
        tuple[int, int, int]]:
    """Write ``out`` from ``raw``; returns the ``(paddr, size, offset)`` of every PT_LOAD
    that holds RAM of the image (the BIOS one of the default layout excepted)."""
    size = os.path.getsize(raw)
    segs = segments if segments is not None else [(0, size)]
    extra = [] if segments is not None else [BIOS]
    shoff, nsh = EHDR.size, 2
    phoff = shoff + nsh * SHDR.size
    note_off = phoff + PHDR.size * (1 + len(segs) + len(extra))
    off = note_off + len(NOTE)
    loads = []
    for paddr, n in [*segs, *extra]:
        loads.append((paddr, n, off))
        off += n
    strtab = b"\0.shstrtab\0"
    head = ehdr(1 + len(loads), phoff=phoff, shoff=shoff, shnum=nsh)
    head += SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    head += SHDR.pack(1, 3, 0, 0, off, len(strtab), 0, 0, 0, 0)
    head += PHDR.pack(4, 0, note_off, 0, 0, len(NOTE), len(NOTE), 0)
    head += b"".join(PHDR.pack(1, 0, o, p, p, n, n, 0) for p, n, o in loads)
    src = os.open(raw, os.O_RDONLY)
    dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(dst, off + len(strtab))
        os.pwrite(dst, head, 0)
        os.pwrite(dst, NOTE, note_off)
        os.pwrite(dst, strtab, off)
        for paddr, n, o in loads:
            if (paddr, n) == BIOS and extra:
                os.pwrite(dst, b"BIOS" * (n // 4), o)
            else:
                _copy_extents(src, paddr, n, dst, o)
    finally:
        os.close(src)
        os.close(dst)
    return [seg for seg in loads if not extra or (seg[0], seg[1]) != BIOS]


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
