"""RAM files for ``luoctl inspect --ram``: a raw image or a QEMU ``dump-guest-memory`` core.

A raw image is physical memory from address 0: file offset == physical address (``luoctl
capture``, ``luoctl example``, QEMU ``pmemsave 0 SIZE FILE``). An ELF core is what QEMU's
``dump-guest-memory FILE`` writes (``dump/dump.c``): an ELF64 header, two section headers
(NULL and ``.shstrtab``) at 0x40, the program headers after them -- a ``PT_NOTE`` first (the
CPUs' registers), then one ``PT_LOAD`` per guest memory block whose ``p_paddr`` is the guest
physical address and ``p_offset`` where its bytes are in the file. For a 512 MiB PC guest
(QEMU of Debian 13, checked on a real dump) that is low RAM in one piece from 0 and the
256 KiB BIOS ROM at ``0xfffc0000``; RAM above the PCI hole would be a third. Its
``e_ehsize`` is 8, not 64 (QEMU stores the size of a pointer), so that field is not checked.
With more than 65534 program headers QEMU stores ``PN_XNUM`` in ``e_phnum`` and the real
count in section header 0's ``sh_info`` (the gABI extended numbering); it is read, but more
than :data:`MAX_PHDRS` is refused.

Either way the file is mapped, never copied: :class:`PhysMem` reads through the mapping, and
for an ELF core :meth:`PhysMem.from_segments` maps each ``PT_LOAD`` at its file offset. The
ELF headers are hostile input like any handover: every field is checked against the file
before use (ENOEXEC for a file that is no x86_64 ELF64 core, EINVAL for program headers
that contradict the file or each other), and ``SEEK_DATA`` finds the parts of a sparse image
that hold data, so that scanning 1 GiB of holes costs nothing.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.tools import inputfile

ELF_MAGIC = b"\x7fELF"
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes
ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_CORE, EM_X86_64 = 4, 62
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
# QEMU writes a PT_NOTE and one PT_LOAD per guest RAM block: a few dozen at most. Each
# PT_LOAD becomes a RAM range that every read is checked against, so a hostile count is refused
# early rather than making every read of the decode slow.
MAX_PHDRS = 4096


@dataclass
class RamInfo:
    """What a RAM file turned out to be, for the report."""

    path: str
    format: str  # "raw" or "elf-core"
    size: int  # file size
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (phys, size, offset)
    notes: list[str] = field(default_factory=list)
    data_extents: list[tuple[int, int]] | None = None  # file [start, end) holding data

    def report(self) -> dict[str, Any]:
        rep: dict[str, Any] = {"path": self.path, "format": self.format,
                               "file_size": self.size}
        if self.format == "elf-core":
            rep["pt_load"] = [{"paddr": f"{p:#x}", "size": n, "offset": f"{o:#x}"}
                              for p, n, o in self.segments]
        if self.notes:
            rep["notes"] = self.notes
        return rep


def _bad(msg: str, err: int = errno.EINVAL) -> AbiError:
    return AbiError(msg=f"ELF core: {msg}", err=err)


def parse_elf_core(buf: mmap.mmap | bytes, size: int) -> tuple[list[tuple[int, int, int]],
                                                               list[str]]:
    """The ``PT_LOAD`` segments of an x86_64 ELF64 little-endian core as ``(p_paddr,
    p_filesz, p_offset)``, after checking every header against the file; and notes on what
    was left out."""
    if size < EHDR.size:
        raise _bad(f"{size} bytes, shorter than the 64-byte ELF header", errno.ENOEXEC)
    (ident, e_type, machine, version, _entry, phoff, shoff, _flags, _ehsize, phentsize,
     phnum, shentsize, _shnum, _shstrndx) = EHDR.unpack_from(buf, 0)
    if ident[:4] != ELF_MAGIC:
        raise _bad("no ELF magic", errno.ENOEXEC)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or ident[6] != EV_CURRENT:
        raise _bad(f"class {ident[4]}, data {ident[5]}, version {ident[6]}: only ELF64 "
                   "little-endian version 1 is supported", errno.ENOEXEC)
    if e_type != ET_CORE:
        raise _bad(f"e_type {e_type} is not ET_CORE (4): not a memory dump", errno.ENOEXEC)
    if machine != EM_X86_64:
        raise _bad(f"e_machine {machine} is not EM_X86_64 (62)", errno.ENOEXEC)
    if version != EV_CURRENT:
        raise _bad(f"e_version {version} is not EV_CURRENT (1)", errno.ENOEXEC)
    if phentsize != PHDR.size:
        raise _bad(f"e_phentsize {phentsize} is not {PHDR.size}")
    if phnum == PN_XNUM:  # extended numbering: the count is in section header 0
        if shoff == 0 or shentsize != SHDR.size or shoff + SHDR.size > size:
            raise _bad(f"e_phnum is PN_XNUM but section header 0 at {shoff:#x} is not in "
                       "the file")
        phnum = SHDR.unpack_from(buf, shoff)[7]
    if not 0 < phnum <= MAX_PHDRS:
        raise _bad(f"{phnum} program headers (1..{MAX_PHDRS})")
    if phoff < EHDR.size:
        raise _bad(f"program headers at {phoff:#x} overlap the ELF header")
    if phoff + phnum * PHDR.size > size:
        raise _bad(f"{phnum} program headers at {phoff:#x} run past the {size:#x}-byte file")
    segs: list[tuple[int, int, int, int]] = []  # (paddr, filesz, offset, index)
    notes: list[str] = []
    short = 0
    for i in range(phnum):
        p_type, _pf, off, _vaddr, paddr, filesz, memsz, _align = PHDR.unpack_from(
            buf, phoff + i * PHDR.size)
        if p_type != PT_LOAD:
            continue
        if filesz > memsz:
            raise _bad(f"PT_LOAD {i}: p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        if off + filesz > size:
            raise _bad(f"PT_LOAD {i}: {filesz:#x} bytes at file offset {off:#x} run past the "
                       f"{size:#x}-byte file (a truncated dump?)")
        if paddr + memsz > 1 << 64:
            raise _bad(f"PT_LOAD {i}: p_paddr {paddr:#x} + p_memsz {memsz:#x} wraps past 2^64")
        short += memsz - filesz
        if filesz:
            segs.append((paddr, filesz, off, i))
    if not segs:
        raise _bad("no PT_LOAD segment with bytes in the file")
    segs.sort()
    for (p0, n0, _, i0), (p1, _, _, i1) in pairwise(segs):
        if p1 < p0 + n0:
            raise _bad(f"PT_LOAD {i0} ({p0:#x}+{n0:#x}) and PT_LOAD {i1} ({p1:#x}) overlap in "
                       "physical memory (a dump made with paging, -p, maps RAM more than once)")
    if short:
        notes.append(f"{short:#x} bytes of p_memsz are not in the file (not treated as RAM)")
    return [(p, n, o) for p, n, o, _ in segs], notes


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The ``[start, end)`` ranges of a sparse file that hold data (``SEEK_DATA`` /
    ``SEEK_HOLE``); None where the filesystem cannot say."""
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after off
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    except OSError:
        return None
    return out


@contextmanager
def open_ram(path: Path) -> Iterator[tuple[PhysMem, RamInfo]]:
    """Map a RAM file read-only; yield its :class:`PhysMem` and what it is."""
    fd = inputfile.open_regular(path, "RAM is a raw image or an ELF core, a regular file")
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"{path}: empty RAM file")
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            info = RamInfo(str(path), "raw", size,
                           data_extents=data_extents(f.fileno(), size))
            if m[:4] == ELF_MAGIC:
                info.format = "elf-core"
                info.segments, info.notes = parse_elf_core(m, size)
                mem = PhysMem.from_segments(m, info.segments)
            else:
                mem = PhysMem(m)
                info.segments = [(0, size, 0)]
            yield mem, info
        finally:
            with suppress(BufferError):  # a numpy view still holds it: the GC unmaps it later
                m.close()
