"""The page allocator: a binary buddy system over page frame numbers, orders 0..10.

Free blocks are kept per order in insertion-ordered dicts of head PFNs whose *end* is the free
list's head; allocation splits, freeing coalesces with the buddy. Work is per block, never per
page: freeing 16 GiB at boot is 4096 order-10 blocks. Page metadata (refcount, order) is
updated by slices.

The order blocks come out in is Linux's, because it decides how physically contiguous a run
of allocations is (a hugetlb pool filled at boot: one extent per run of adjacent pages for
every mapping of a file on it): ``memblock_free_all`` frees to the list's tail
(``__free_pages_core`` passes ``FPI_TO_TAIL``, since v5.10), ``__rmqueue_smallest`` takes
the head, and ``expand`` keeps the lowest part of a split block and puts each upper half at
the head -- so allocations after boot walk memory upwards. A later free goes to the head
(``__free_one_page``; its ``buddy_merge_likely`` tail placement is not modelled, nor are
migratetypes, per-CPU lists or deferred struct page init: none changes the upward walk).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from liveupdate.abi.consts import MAX_PAGE_ORDER
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.mm.pages import PageMeta


def block_orders(pfn: int, end: int, max_order: int | None = None) -> list[tuple[int, int]]:
    """Split [pfn, end) into naturally aligned blocks of order min(ctz(pfn), ilog2(left)).

    Uncapped (``max_order=None``) it is upstream ``kho_preserve_pages()``/
    ``kho_restore_pages()``'s split, which has no MAX_PAGE_ORDER cap; the boot-time free
    (``memblock_free_all``) caps at MAX_PAGE_ORDER, the buddy's largest block."""
    out = []
    while pfn < end:
        left = (end - pfn).bit_length() - 1
        align = (pfn & -pfn).bit_length() - 1 if pfn else left
        order = min(align, left) if max_order is None else min(align, left, max_order)
        out.append((pfn, order))
        pfn += 1 << order
    return out


NONE: dict[int, None] = {}  # no blocks pending: free() merges with the lists alone


class Buddy:
    def __init__(self, meta: PageMeta) -> None:
        self.meta = meta
        self.free_lists: list[dict[int, None]] = [{} for _ in range(MAX_PAGE_ORDER + 1)]
        self.nr_free = 0

    def free_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Give whole PFN ranges to the allocator (``memblock_free_all``), each block to its
        list's tail in the order given; one rebuild per order, not per block or range."""
        tails: list[dict[int, None]] = [{} for _ in range(MAX_PAGE_ORDER + 1)]
        for start_pfn, end_pfn in ranges:
            for pfn, order in block_orders(start_pfn, end_pfn, MAX_PAGE_ORDER):
                pfn, order = self._merge(pfn, order, tails)
                tails[order][pfn] = None
                self.nr_free += 1 << order
        for order, new in enumerate(tails):
            if new:  # the tail is the dict's start: the first freed ends up nearest the head
                rebuilt = dict.fromkeys(reversed(new))
                rebuilt.update(self.free_lists[order])
                self.free_lists[order] = rebuilt

    def _merge(self, pfn: int, order: int, pending: list[dict[int, None]] | None = None
               ) -> tuple[int, int]:
        """Coalesce a block being freed with its free buddies (taken off their lists)."""
        self.meta.refcount[pfn : pfn + (1 << order)] = 0
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            for fl in (self.free_lists[order], pending[order] if pending is not None else NONE):
                if buddy in fl:
                    del fl[buddy]
                    break
            else:
                break
            self.nr_free -= 1 << order
            pfn = min(pfn, buddy)
            order += 1
        return pfn, order

    def alloc(self, order: int) -> int:
        """Allocate 2^order pages; returns the head PFN (refcount 1). ENOMEM."""
        if not 0 <= order <= MAX_PAGE_ORDER:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"page order {order} out of range")
        for o in range(order, MAX_PAGE_ORDER + 1):
            if self.free_lists[o]:
                pfn, _ = self.free_lists[o].popitem()  # the head
                self.nr_free -= 1 << o
                while o > order:  # expand: the upper half to the head, the lower kept
                    o -= 1
                    self.free_lists[o][pfn + (1 << o)] = None
                    self.nr_free += 1 << o
                self.meta.refcount[pfn] = 1
                self.meta.order[pfn] = order
                return pfn
        raise LiveUpdateError(err=errno.ENOMEM, msg=f"out of memory allocating order {order}")

    def free(self, pfn: int, order: int) -> None:
        pfn, order = self._merge(pfn, order)
        self.free_lists[order][pfn] = None  # the head
        self.nr_free += 1 << order
