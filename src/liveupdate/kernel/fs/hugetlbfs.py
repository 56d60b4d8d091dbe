"""A hugetlb memfd (``memfd_create(MFD_HUGETLB)``: ``hugetlb_file_setup`` on the internal
hugetlbfs mount of one hstate, ``fs/hugetlbfs/inode.c``), over huge folios of that hstate's
pool (:mod:`liveupdate.kernel.mm.hugetlb`).

It is a :class:`~liveupdate.kernel.fs.memfd.Memfd` (the same folio arrays, seals,
``extents`` and reads) whose every folio has the hstate's order and comes from, and goes back
to, the pool -- never the buddy allocator. What hugetlbfs does differently, as 7.3.4:

* ``ftruncate`` to a size that is not a multiple of the huge page: EINVAL
  (``hugetlbfs_setattr``);
* ``write``/``pwrite``: EINVAL (hugetlbfs has no ``write_iter``: ``vfs_write`` refuses);
* ``fallocate`` rounds the range out to huge pages and allocates page by page: an empty pool
  is ENOSPC (``alloc_hugetlb_folio``), the pages allocated before it stay; unknown modes
  EOPNOTSUPP; growing past ``F_SEAL_GROW`` EPERM; a hole punch frees whole huge pages and
  zeroes the partial ones;
* ``mmap``: the offset must be huge-page aligned (EINVAL), the length is rounded up to the
  huge page, the pages are reserved at mmap (``hugetlb_reserve_pages``: ENOMEM when the pool
  cannot hold them) -- here they are taken at once, as the fault would -- and a writable
  mapping past ``i_size`` extends it (``hugetlbfs_file_mmap``).

A preserved file is frozen as a memfd is (the RFC's 09/10: no grow or shrink).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs import memfd
from liveupdate.kernel.mm.hugetlb import Hstate

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

MFD_HUGETLB = 0x4
MFD_HUGE_SHIFT, MFD_HUGE_MASK = 26, 0x3F


class PoolOps:
    """The memfd's :class:`~liveupdate.kernel.fs.memfd.PageOps`: folios from the hstate."""

    def __init__(self, k: Kernel, h: Hstate) -> None:
        self.k, self.h = k, h

    def alloc_pages(self, order: int) -> int:
        assert order == self.h.order, "a hugetlb file only has folios of its hstate"
        return self.h.dequeue()

    def free_pages(self, phys: int, order: int) -> None:
        self.h.enqueue(phys)

    def read(self, phys: int, size: int) -> bytes:
        return self.k.read(phys, size)

    def write(self, phys: int, data: bytes) -> None:
        self.k.write(phys, data)

    def zero(self, phys: int, size: int) -> None:
        self.k.zero(phys, size)


@dataclass(eq=False)
class HugeMemfd(memfd.Memfd):
    horder: int = 9  # the hstate's order

    @property
    def hsize(self) -> int:
        return 1 << (self.horder + PAGE_SHIFT)

    def _folio_order(self, idx: int, hole_end: int) -> int:
        return self.horder

    def populate(self, first: int, last: int) -> int:
        span = 1 << self.horder
        return super().populate(first // span * span, -(-last // span) * span)

    def truncate(self, size: int) -> None:
        if size % self.hsize:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"ftruncate: {size:#x} is not a "
                                  f"multiple of the huge page ({self.hsize:#x})")
        super().truncate(size)

    def pwrite(self, data: bytes, off: int) -> int:
        raise LiveUpdateError(err=errno.EINVAL, msg="write: a hugetlbfs file cannot be "
                              "written (mmap it)")

    def fallocate(self, mode: int, off: int, length: int) -> None:
        if mode & ~(memfd.FALLOC_FL_KEEP_SIZE | memfd.FALLOC_FL_PUNCH_HOLE):
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="fallocate: unsupported mode")
        if off < 0 or length <= 0:
            raise LiveUpdateError(err=errno.EINVAL, msg="fallocate: bad offset or length")
        end = off + length
        if mode & memfd.FALLOC_FL_PUNCH_HOLE:
            super().fallocate(mode, off, length)
            return
        if end > memfd.MAX_LFS_FILESIZE:
            raise LiveUpdateError(err=errno.EFBIG, msg="fallocate: past the largest file")
        grow = not mode & memfd.FALLOC_FL_KEEP_SIZE and end > self.size
        if end > self.size and self.seals & memfd.F_SEAL_GROW:
            raise LiveUpdateError(err=errno.EPERM, msg="fallocate: the memfd is sealed")
        self._check_resize("fallocate", end if grow else None)
        span = 1 << self.horder
        first, last = off // self.hsize, -(-end // self.hsize)
        for i in range(first, last):  # page by page: what was allocated before ENOSPC stays
            super().populate(i * span, (i + 1) * span)
        if grow:
            self.size = end

    def mmap_range(self, off: int, length: int, writable: bool) -> tuple[int, int]:
        """``hugetlbfs_file_mmap``: the checks and the reservation; the page range."""
        if writable:
            self.check_write("mmap(PROT_WRITE)")  # before anything changes
        if off % self.hsize:
            raise LiveUpdateError(err=errno.EINVAL, msg="mmap: offset not aligned to the "
                                  "huge page")
        end = -(-(off + length) // self.hsize) * self.hsize
        first, last = off >> PAGE_SHIFT, end >> PAGE_SHIFT
        need = sum(b - a for a, b in self.holes(first, last)) >> self.horder
        pool = self.mm.h if isinstance(self.mm, PoolOps) else None
        if pool is not None and need > len(pool.free):
            raise LiveUpdateError(err=errno.ENOMEM, msg=f"mmap: {need} huge pages needed, "
                                  f"{len(pool.free)} free in the pool")
        if writable and end > self.size:
            self._check_resize("mmap", end)
            self.size = end
        return first, last


def memfd_create(k: Kernel, name: str, flags: int) -> HugeMemfd:
    """``hugetlb_file_setup``: the hstate of the size in ``flags`` (0: the default one);
    ENODEV when there is no such hstate (``get_hstate_idx``)."""
    log = (flags >> MFD_HUGE_SHIFT) & MFD_HUGE_MASK
    h = None if k.hugetlb is None else k.hugetlb.sizelog(log)
    if h is None:
        raise LiveUpdateError(err=errno.ENODEV, msg=f"memfd_create: no hstate of 2^{log} "
                              "bytes")
    m = HugeMemfd(PoolOps(k, h), name, k.next_ino, "always", horder=h.order)
    k.next_ino += 1
    return m
