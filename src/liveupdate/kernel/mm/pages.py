"""Page metadata ("struct page"), one entry per page frame in numpy arrays.

The kernel keeps it in its own process memory; what models the memmap's *cost* is the
64 bytes per page the kernel reserves in RAM at boot (``MEMMAP_BYTES_PER_PAGE``). Every update
is a slice or fancy-index assignment: never a Python call per page.
"""

from __future__ import annotations

import numpy as np

from liveupdate.abi.consts import PAGE_SHIFT

MEMMAP_BYTES_PER_PAGE = 64
KHO_PAGE_MAGIC = 0x4B484F50  # 'KHOP'


class PageMeta:
    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        self.private = np.zeros(nr_pages, np.uint64)  # kho_page_info: order | magic << 32
        self.refcount = np.zeros(nr_pages, np.int32)
        self.order = np.zeros(nr_pages, np.uint8)  # order of the folio a head page starts

    @classmethod
    def populated(cls, nr_pages: int) -> PageMeta:
        """Arrays whose host memory is already faulted in: for a kernel process that waits
        to be jumped to (kernel/main.py, "prepare"). The memmap's backing is allocated at
        boot (``sparse_init``); this only moves the *host's* page faults out of the jump --
        numpy asks for transparent huge pages on arrays this big, and a fault that must
        compact memory for one took 30-40 ms here, inside the VMs' pause. Zeros, nothing
        else: the kernel that runs on them knows nothing more."""
        meta = cls(nr_pages)
        for arr in (meta.private, meta.refcount, meta.order):
            arr.fill(0)
        return meta

    def pfn_valid(self, pfn: int) -> bool:
        return 0 <= pfn < self.nr_pages

    def mark_kho_preserved(self, phys: np.ndarray, order: np.ndarray) -> None:
        pfn = (np.asarray(phys, np.uint64) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        ok = pfn < self.nr_pages
        self.private[pfn[ok]] = np.asarray(order, np.uint64)[ok] | np.uint64(
            KHO_PAGE_MAGIC << 32)
