"""memfd: an anonymous shmem file over folios of the emulated kernel's RAM (``mm/shmem.c``,
``mm/memfd.c``).

A :class:`Memfd` is the inode: a size, and folios held as three numpy arrays sorted by file
page index (head index, physical address, order) -- no Python object per page. Holes are
unallocated and read as zeros; a write, an mmap or a preservation allocates them.

Folio sizes follow ``transparent_hugepage_shmem=`` from the command line: ``within_size``
(the default on our images' command line) gives, at each hole, the largest naturally aligned
folio up to PMD order 9 that lies within ``i_size``; ``never`` gives 4 KiB folios; ``always``
gives up to order 9 regardless of size.

``mmap`` does not copy: the kernel returns the folios' physical extents (physically adjacent
folios merged) and the process maps them from the RAM fd the kernel hands it, as ``/dev/mem``
would. A mapping pins the file's folios for as long as the mapping process lives (the kernel
drops the reference when the process's connection ends). The emulation trusts its userspace
with RAM mappings (ARCHITECTURE.md).

Preservation freezes the size (``shmem_freeze``, ``SHMEM_F_MAPPING_FROZEN``): ``ftruncate`` to
another size, a write past ``i_size`` and ``fallocate`` fail with EPERM; reads, writes inside
the size and mmap keep working.

Seals (``memfd_add_seals``): a memfd made without ``MFD_ALLOW_SEALING`` starts with
``F_SEAL_SEAL``; ``F_SEAL_SHRINK``/``GROW`` refuse size changes that way, ``F_SEAL_WRITE``
and ``F_SEAL_FUTURE_WRITE`` refuse writes and writable mappings (EPERM); adding seals to a
``F_SEAL_SEAL`` file is EPERM, unknown bits EINVAL, ``F_SEAL_WRITE`` on a preserved memfd
EBUSY (``memfd_wait_for_pins``: LUO holds every folio pinned).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs.file import File

HPAGE_PMD_ORDER = 9
MAX_LFS_FILESIZE = (1 << 63) - 1
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2
THP_MODES = ("within_size", "never", "always")
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 0x10, 0x20
ALL_SEALS = 0x3F
# what F_SEAL_EXEC brings along on an executable memfd (W^X from the start)
EXEC_IMPLIES = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE
MODE_EXEC = 0o777  # a memfd's inode mode without MFD_NOEXEC_SEAL (vm.memfd_noexec=0)
MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_NOEXEC_SEAL, MFD_EXEC = 0x1, 0x2, 0x8, 0x10
MODE_NOEXEC = 0o666  # MFD_NOEXEC_SEAL clears the execute bits


class PageOps(Protocol):
    """What a memfd needs from the kernel's memory management."""

    def alloc_pages(self, order: int) -> int: ...
    def free_pages(self, phys: int, order: int) -> None: ...
    def read(self, phys: int, size: int) -> bytes: ...
    def write(self, phys: int, data: bytes) -> None: ...
    def zero(self, phys: int, size: int) -> None: ...


def implied_seals(seals: int, mode: int) -> int:
    """``memfd_add_seals``: F_SEAL_EXEC on a memfd with an execute bit also adds
    SHRINK|GROW|WRITE|FUTURE_WRITE (7.3.4 mm/memfd.c). Memfd core, older than LUO: it is in
    torvalds/linux mm/memfd.c at 037dd1308c6d (memfd_create still inline, "SEAL_EXEC implys
    SEAL_WRITE") and in 6.18 stable's copy, where 3b041514cb6e moved it before the
    write-mapping check -- so every emulated generation does it."""
    return seals | EXEC_IMPLIES if seals & F_SEAL_EXEC and mode & 0o111 else seals


def init_seals(m: Memfd, flags: int) -> None:
    """``memfd_alloc_file``: MFD_NOEXEC_SEAL clears the execute bits and leaves F_SEAL_EXEC
    (sealable, whatever MFD_ALLOW_SEALING says); MFD_ALLOW_SEALING alone clears F_SEAL_SEAL;
    otherwise the memfd keeps F_SEAL_SEAL."""
    if flags & MFD_NOEXEC_SEAL:
        m.mode, m.seals = MODE_NOEXEC, F_SEAL_EXEC
    elif flags & MFD_ALLOW_SEALING:
        m.seals = 0


def _pages(size: int) -> int:
    return -(-size // PAGE_SIZE)


@dataclass(eq=False)
class Memfd:
    mm: PageOps
    name: str
    ino: int
    thp: str = "within_size"
    size: int = 0
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    phys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    frozen: bool = False  # SHMEM_F_MAPPING_FROZEN: preserved, the size cannot change
    seals: int = F_SEAL_SEAL
    mode: int = MODE_EXEC  # MODE_NOEXEC with MFD_NOEXEC_SEAL
    refs: int = 0  # open files, mappings and LUO
    on_free: Callable[[Memfd], None] | None = None

    # -- references -----------------------------------------------------------------------
    def get(self) -> Memfd:
        self.refs += 1
        return self

    def put(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.free_folios(0)
            if self.on_free is not None:
                self.on_free(self)

    # -- folios ---------------------------------------------------------------------------
    @property
    def nr_pages(self) -> int:
        """Pages held (``st_blocks`` / 8)."""
        return int((np.int64(1) << self.order.astype(np.int64)).sum())

    def _folio_order(self, idx: int, hole_end: int) -> int:
        if self.thp == "never":
            return 0
        limit = hole_end if self.thp == "always" else min(hole_end, _pages(self.size))
        o = HPAGE_PMD_ORDER
        while o and (idx % (1 << o) or idx + (1 << o) > limit):
            o -= 1
        return o

    def holes(self, first: int, last: int) -> list[tuple[int, int]]:
        """Unallocated page ranges inside ``[first, last)`` (folios never overlap)."""
        ends = self.index + (np.int64(1) << self.order.astype(np.int64))
        lo = int(np.searchsorted(ends, first, "right"))
        hi = int(np.searchsorted(self.index, last, "left"))
        starts = np.concatenate([[first], np.maximum(ends[lo:hi], first)])
        stops = np.concatenate([np.minimum(self.index[lo:hi], last), [last]])
        keep = stops > starts
        return list(zip(starts[keep].tolist(), stops[keep].tolist(), strict=True))

    def populate(self, first: int, last: int) -> int:
        """Allocate every hole in pages ``[first, last)`` (zeroed folios); all or nothing.
        Returns the pages allocated; ENOMEM leaves the file as it was.

        With huge folios a fault allocates the whole aligned PMD block around the page (as
        ``shmem_get_folio`` does), so the range grows to 2 MiB boundaries -- within
        ``i_size`` for ``within_size``."""
        if self.thp != "never":
            span = 1 << HPAGE_PMD_ORDER
            end = -(-last // span) * span
            first = first // span * span
            last = end if self.thp == "always" else max(last, min(end, _pages(self.size)))
        new_idx: list[int] = []
        new_phys: list[int] = []
        new_order: list[int] = []
        try:
            for h0, h1 in self.holes(first, last):
                i = h0
                while i < h1:
                    o = self._folio_order(i, h1)
                    p = self.mm.alloc_pages(o)
                    new_idx.append(i)
                    new_phys.append(p)
                    new_order.append(o)
                    self.mm.zero(p, PAGE_SIZE << o)
                    i += 1 << o
        except LiveUpdateError:
            for p, o in zip(new_phys, new_order, strict=True):
                self.mm.free_pages(p, o)
            raise
        if new_idx:
            idx = np.concatenate([self.index, np.array(new_idx, np.int64)])
            srt = np.argsort(idx, kind="stable")
            self.index = idx[srt]
            self.phys = np.concatenate([self.phys, np.array(new_phys, np.uint64)])[srt]
            self.order = np.concatenate([self.order, np.array(new_order, np.uint8)])[srt]
        return sum(1 << o for o in new_order)

    def adopt(self, index: np.ndarray, phys: np.ndarray, order: np.ndarray) -> None:
        """Take folios restored from a previous kernel (they become this file's)."""
        srt = np.argsort(index, kind="stable")
        self.index = np.asarray(index, np.int64)[srt]
        self.phys = np.asarray(phys, np.uint64)[srt]
        self.order = np.asarray(order, np.uint8)[srt]

    def free_folios(self, first_page: int) -> None:
        """Free every folio that starts at or after ``first_page``."""
        keep = self.index < first_page
        for p, o in zip(self.phys[~keep].tolist(), self.order[~keep].tolist(), strict=True):
            self.mm.free_pages(p, o)
        self.index, self.phys, self.order = self.index[keep], self.phys[keep], self.order[keep]

    def extents(self, first: int, last: int) -> list[tuple[int, int]]:
        """(phys, bytes) runs covering pages ``[first, last)`` in file order, physically
        adjacent folios merged. Every page must be allocated."""
        ends = self.index + (np.int64(1) << self.order.astype(np.int64))
        lo = int(np.searchsorted(ends, first, "right"))
        hi = int(np.searchsorted(self.index, last, "left"))
        start = np.maximum(self.index[lo:hi], first)
        end = np.minimum(ends[lo:hi], last)
        phys = self.phys[lo:hi].astype(np.int64) + ((start - self.index[lo:hi]) << PAGE_SHIFT)
        size = (end - start) << PAGE_SHIFT
        if not len(phys):
            return []
        # a run continues while each piece starts where the previous one ended in RAM
        new = np.ones(len(phys), bool)
        new[1:] = phys[1:] != phys[:-1] + size[:-1]
        run = np.cumsum(new) - 1
        lengths = np.bincount(run, weights=size).astype(np.int64)
        return list(zip(phys[new].tolist(), lengths.tolist(), strict=True))

    # -- file operations ------------------------------------------------------------------
    def _check_resize(self, what: str, new_size: int | None = None) -> None:
        if self.frozen:
            raise LiveUpdateError(err=errno.EPERM,
                                  msg=f"{what}: the memfd is preserved; its size is frozen")
        if new_size is not None and ((new_size < self.size and self.seals & F_SEAL_SHRINK)
                                     or (new_size > self.size and self.seals & F_SEAL_GROW)):
            raise LiveUpdateError(err=errno.EPERM, msg=f"{what}: the memfd is sealed")

    def check_write(self, what: str) -> None:
        if self.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            raise LiveUpdateError(err=errno.EPERM, msg=f"{what}: the memfd is write-sealed")

    def add_seals(self, seals: int) -> None:
        if seals & ~ALL_SEALS:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"F_ADD_SEALS: unknown seals {seals:#x}")
        if self.seals & F_SEAL_SEAL:
            raise LiveUpdateError(err=errno.EPERM, msg="F_ADD_SEALS: the memfd has F_SEAL_SEAL")
        seals = implied_seals(seals, self.mode)
        if seals & F_SEAL_WRITE and not self.seals & F_SEAL_WRITE and self.frozen:
            # memfd_wait_for_pins: LUO pinned every folio (memfd_pin_folios) at PRESERVE_FD
            raise LiveUpdateError(err=errno.EBUSY, msg="F_ADD_SEALS: F_SEAL_WRITE on a "
                                  "memfd whose folios are pinned (preserved)")
        self.seals |= seals

    def truncate(self, size: int) -> None:
        if not 0 <= size <= MAX_LFS_FILESIZE:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"ftruncate: bad size {size}")
        if size != self.size:
            self._check_resize("ftruncate", size)
        if size < self.size:
            self.free_folios(_pages(size))
            tail = size % PAGE_SIZE  # the kept folio's bytes past the new end read as zero
            if tail:
                self._write_allocated(size, bytes(PAGE_SIZE - tail))
        self.size = size

    def pwrite(self, data: bytes, off: int) -> int:
        if off < 0 or off + len(data) > MAX_LFS_FILESIZE:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"pwrite: bad offset {off}")
        if not data:
            return 0
        self.check_write("write")
        end = off + len(data)
        old = self.size
        if end > old:
            self._check_resize("write past the end", end)
            self.size = end  # first, so that the folios fit the new size
        try:
            self.populate(off >> PAGE_SHIFT, _pages(end))
        except LiveUpdateError:
            self.size = old
            raise
        self._write_allocated(off, data)
        return len(data)

    def _write_allocated(self, off: int, data: bytes) -> None:
        pos = 0
        for phys, n in self.extents(off >> PAGE_SHIFT, _pages(off + len(data))):
            skip = off % PAGE_SIZE if pos == 0 else 0
            chunk = data[pos : pos + n - skip]
            self.mm.write(phys + skip, chunk)
            pos += len(chunk)

    def pread(self, n: int, off: int) -> bytes:
        if off < 0 or n < 0:
            raise LiveUpdateError(err=errno.EINVAL, msg="pread: negative offset or count")
        end = min(off + n, self.size)
        if off >= end:
            return b""
        out = bytearray(end - off)
        ends = self.index + (np.int64(1) << self.order.astype(np.int64))
        lo = int(np.searchsorted(ends, off >> PAGE_SHIFT, "right"))
        for i in range(lo, len(self.index)):
            fstart = int(self.index[i]) << PAGE_SHIFT
            fend = int(ends[i]) << PAGE_SHIFT
            if fstart >= end:
                break
            a, b = max(fstart, off), min(fend, end)
            out[a - off : b - off] = self.mm.read(int(self.phys[i]) + a - fstart, b - a)
        return bytes(out)

    def fallocate(self, mode: int, off: int, length: int) -> None:
        if off < 0 or length <= 0 or mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise LiveUpdateError(err=errno.EINVAL, msg="fallocate: bad mode, offset or length")
        end = off + length
        self._check_resize("fallocate", None if mode & FALLOC_FL_KEEP_SIZE else max(end, self.size))
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise LiveUpdateError(err=errno.EOPNOTSUPP,
                                      msg="fallocate: PUNCH_HOLE needs KEEP_SIZE")
            self._punch(off, min(end, self.size))
            return
        old = self.size
        if not mode & FALLOC_FL_KEEP_SIZE:
            self.size = max(old, end)  # first, so that within_size folios fit the new size
        try:
            self.populate(off >> PAGE_SHIFT, _pages(end))
        except LiveUpdateError:
            self.size = old
            raise

    def _punch(self, off: int, end: int) -> None:
        """Free the folios wholly inside ``[off, end)``; zero the bytes of the others."""
        if off >= end:
            return
        starts = self.index << PAGE_SHIFT
        ends = (self.index + (np.int64(1) << self.order.astype(np.int64))) << PAGE_SHIFT
        whole = (starts >= off) & (ends <= end)
        for p, o in zip(self.phys[whole].tolist(), self.order[whole].tolist(), strict=True):
            self.mm.free_pages(p, o)
        self.index, self.phys, self.order = (self.index[~whole], self.phys[~whole],
                                             self.order[~whole])
        starts, ends = starts[~whole], ends[~whole]
        for i in np.flatnonzero((starts < end) & (ends > off)).tolist():
            a, b = max(int(starts[i]), off), min(int(ends[i]), end)
            self.mm.write(int(self.phys[i]) + a - int(starts[i]), bytes(b - a))

class MemfdOps:
    """The memfd kind of file: releasing the last open file drops its inode reference."""

    name = "memfd"

    def release(self, f: File) -> None:
        f.private.put()


MEMFD_OPS = MemfdOps()


def open_file(m: Memfd, pos: int = 0) -> File:
    """A new open file of ``m`` (``alloc_file``); its handles keep it alive."""
    return File(MEMFD_OPS, m.get(), pos)


def lseek(pos: int, size: int, off: int, whence: int) -> int:
    base = {SEEK_SET: 0, SEEK_CUR: pos, SEEK_END: size}.get(whence)
    if base is None:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"lseek: bad whence {whence}")
    new = base + off
    if not 0 <= new <= MAX_LFS_FILESIZE:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"lseek: position {new} out of range")
    return new
