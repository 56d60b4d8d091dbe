"""The page allocator: a binary buddy system over page frame numbers, orders 0..10.

Free blocks are kept per order in sets of head PFNs; allocation splits, freeing coalesces
with the buddy. Work is per block, never per page: freeing 16 GiB at boot is 4096 order-10
blocks. Page metadata (refcount, order) is updated by slices.
"""

from __future__ import annotations

import errno

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


class Buddy:
    def __init__(self, meta: PageMeta) -> None:
        self.meta = meta
        self.free_lists: list[set[int]] = [set() for _ in range(MAX_PAGE_ORDER + 1)]
        self.nr_free = 0

    def free_range(self, start_pfn: int, end_pfn: int) -> None:
        """Give a whole range to the allocator (memblock_free_all)."""
        for pfn, order in block_orders(start_pfn, end_pfn, MAX_PAGE_ORDER):
            self._insert(pfn, order)

    def _insert(self, pfn: int, order: int) -> None:
        self.meta.refcount[pfn : pfn + (1 << order)] = 0
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy not in self.free_lists[order]:
                break
            self.free_lists[order].remove(buddy)
            self.nr_free -= 1 << order
            pfn = min(pfn, buddy)
            order += 1
        self.free_lists[order].add(pfn)
        self.nr_free += 1 << order

    def alloc(self, order: int) -> int:
        """Allocate 2^order pages; returns the head PFN (refcount 1). ENOMEM."""
        if not 0 <= order <= MAX_PAGE_ORDER:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"page order {order} out of range")
        for o in range(order, MAX_PAGE_ORDER + 1):
            if self.free_lists[o]:
                pfn = self.free_lists[o].pop()
                self.nr_free -= 1 << o
                while o > order:
                    o -= 1
                    self.free_lists[o].add(pfn)
                    self.nr_free += 1 << o
                    pfn += 1 << o
                self.meta.refcount[pfn] = 1
                self.meta.order[pfn] = order
                return pfn
        raise LiveUpdateError(err=errno.ENOMEM, msg=f"out of memory allocating order {order}")

    def free(self, pfn: int, order: int) -> None:
        self._insert(pfn, order)
