"""The preserved-page tracker (``kho_mem_track``): per order, bitmaps indexed by
``(pfn >> order) // BITS`` -- Linux's layout -- held as numpy arrays, so a bulk preserve is one
array operation per bitmap touched.

Preserve checks come first and all of them (nothing is half-preserved): the block aligned to
its order, the order in range, and -- as CONFIG_KEXEC_HANDOVER_DEBUG does; we always check --
no overlap with a scratch area (EINVAL). On kho-v3+ kernels every touched bitmap is also
written, whole, to the radix tree in RAM (:mod:`liveupdate.kernel.kho.radix`, the ``mirror``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np

from liveupdate.abi import bootparams
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.kho_memmap import MAX_MAP_ORDER
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.mm.buddy import block_orders

Mirror = Callable[[int, int, np.ndarray], None]  # (order, bitmap index, the whole bitmap)


def overlaps_scratch(starts: np.ndarray, ends: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Which of the ``[start, end)`` blocks overlap any scratch area (a bool per block)."""
    starts, ends = np.asarray(starts, np.uint64), np.asarray(ends, np.uint64)
    hit = np.zeros(len(starts), bool)
    for a, s in bootparams.scratch_areas(scratch):
        if s:
            hit |= (starts < np.uint64(a + s)) & (ends > np.uint64(a))
    return hit


class Tracker:
    def __init__(self, bitmap_bytes: int, scratch: np.ndarray, mirror: Mirror | None) -> None:
        self.bits_per = bitmap_bytes * 8
        self.scratch = scratch  # structured array of (addr, size)
        self.mirror = mirror
        self.bitmaps: dict[int, dict[int, np.ndarray]] = {}

    def clear(self) -> None:
        """Forget every preservation (``kho_abort`` on the notifier cores)."""
        self.bitmaps = {}

    def _check(self, phys: int, order: int, max_order: int) -> None:
        if not 0 <= order <= max_order or phys % (PAGE_SIZE << order):
            raise LiveUpdateError(err=errno.EINVAL, msg=f"KHO: bad block {phys:#x} order {order}")
        if overlaps_scratch(np.array([phys]), np.array([phys + (PAGE_SIZE << order)]),
                            self.scratch)[0]:
            raise LiveUpdateError(
                err=errno.EINVAL, msg=f"KHO: {phys:#x} order {order} overlaps scratch")

    def _bit(self, phys: int, order: int, value: bool) -> None:
        high = phys >> (PAGE_SHIFT + order)
        bitmaps = self.bitmaps.setdefault(order, {})
        idx = high // self.bits_per
        if idx not in bitmaps:
            if not value:
                return
            bitmaps[idx] = np.zeros(self.bits_per, bool)
        bitmaps[idx][high % self.bits_per] = value
        if self.mirror is not None:
            self.mirror(order, idx, bitmaps[idx])

    def add(self, phys: int, order: int) -> None:
        """One folio (``kho_preserve_folio``: up to MAX_PAGE_ORDER)."""
        self._check(phys, order, MAX_PAGE_ORDER)
        self._bit(phys, order, True)

    def remove(self, phys: int, order: int) -> None:
        self._bit(phys, order, False)

    def add_pages(self, phys: int, nr: int) -> None:
        """kho_preserve_pages: upstream's split has no MAX_PAGE_ORDER cap (see block_orders),
        so an aligned 16 MiB range is one order-12 block in the map."""
        blocks = block_orders(phys >> PAGE_SHIFT, (phys >> PAGE_SHIFT) + nr)
        for pfn, order in blocks:  # all checks first: nothing is half-preserved
            self._check(pfn << PAGE_SHIFT, order, MAX_MAP_ORDER)
        for pfn, order in blocks:
            self._bit(pfn << PAGE_SHIFT, order, True)

    def remove_pages(self, phys: int, nr: int) -> None:
        for pfn, order in block_orders(phys >> PAGE_SHIFT, (phys >> PAGE_SHIFT) + nr):
            self._bit(pfn << PAGE_SHIFT, order, False)

    def add_blocks(self, phys: np.ndarray, order: np.ndarray,
                   max_order: int = MAX_PAGE_ORDER) -> None:
        """Bulk preserve, vectorized (one array operation per bitmap touched). Folios up to
        MAX_PAGE_ORDER, or ``max_order`` (the hugetlb RFC's 01/10 lifts the limit: 1 GiB
        folios are order 18)."""
        phys = np.asarray(phys, np.uint64)
        order = np.asarray(order, np.uint8)
        if len(order) and int(order.max()) > max_order:
            raise LiveUpdateError(
                err=errno.EINVAL, msg=f"KHO: order {int(order.max())} out of range")
        size = np.uint64(PAGE_SIZE) << order.astype(np.uint64)
        if np.any(phys % size):  # all checks first: nothing is half-preserved
            raise LiveUpdateError(err=errno.EINVAL, msg="KHO: a block is misaligned")
        if np.any(overlaps_scratch(phys, phys + size, self.scratch)):
            raise LiveUpdateError(err=errno.EINVAL, msg="KHO: a block overlaps scratch")
        for o in np.unique(order).tolist():
            high = phys[order == o] >> np.uint64(PAGE_SHIFT + o)
            idx = high // np.uint64(self.bits_per)
            bitmaps = self.bitmaps.setdefault(o, {})
            for i in np.unique(idx).tolist():
                bm = bitmaps.setdefault(i, np.zeros(self.bits_per, bool))
                bm[(high[idx == i] % np.uint64(self.bits_per)).astype(np.int64)] = True
                if self.mirror is not None:
                    self.mirror(o, i, bm)

    def remove_blocks(self, phys: np.ndarray, order: np.ndarray) -> None:
        """Bulk unpreserve, the symmetric pair of :meth:`add_blocks`."""
        phys = np.asarray(phys, np.uint64)
        order = np.asarray(order, np.uint8)
        for o in np.unique(order).tolist():
            high = phys[order == o] >> np.uint64(PAGE_SHIFT + o)
            idx = high // np.uint64(self.bits_per)
            bitmaps = self.bitmaps.get(o, {})
            for i in np.unique(idx).tolist():
                bm = bitmaps.get(i)
                if bm is not None:
                    bm[(high[idx == i] % np.uint64(self.bits_per)).astype(np.int64)] = False
                    if self.mirror is not None:
                        self.mirror(o, i, bm)

    def preserved(self) -> tuple[np.ndarray, np.ndarray]:
        """Every preserved block as (phys, order) arrays."""
        phys, order = [], []
        for o, bitmaps in sorted(self.bitmaps.items()):
            for i, bm in sorted(bitmaps.items()):
                high = np.flatnonzero(bm).astype(np.uint64) + np.uint64(i * self.bits_per)
                phys.append(high << np.uint64(PAGE_SHIFT + o))
                order.append(np.full(len(high), o, np.uint8))
        if not phys:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint8)
        return np.concatenate(phys), np.concatenate(order)
