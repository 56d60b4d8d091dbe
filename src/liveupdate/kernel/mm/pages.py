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

    def pfn_valid(self, pfn: int) -> bool:
        return 0 <= pfn < self.nr_pages

    def mark_kho_preserved(self, phys: np.ndarray, order: np.ndarray) -> None:
        pfn = (np.asarray(phys, np.uint64) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        ok = pfn < self.nr_pages
        self.private[pfn[ok]] = np.asarray(order, np.uint64)[ok] | np.uint64(
            KHO_PAGE_MAGIC << 32)
