"""The live radix tracker of kho-v3/kho-v4 kernels (7.1+, ``kho_radix_add_page`` /
``kho_radix_del_page``): the preserved-memory map lives in RAM from ``kho_init`` on, so the
reboot path serializes nothing (stateless KHO, spec/kho.md 3.2).

The root node is allocated at boot (``kzalloc(PAGE_SIZE)`` in ``kho_init``); a preserve walks
from it, allocating zeroed pages for missing nodes, and sets the leaf bit. A delete clears the
bit and never frees a node, as upstream. Node pages are not preserved -- like kho-v1's chunks,
the next kernel reads them while it still allocates from scratch only -- but the sanitizer
keeps them (:meth:`RadixLive.pages`).

:class:`liveupdate.kernel.kho.tracker.Tracker` keeps its per-order numpy bitmaps as the index
(a leaf covers exactly the blocks one PAGE_SIZE kho-v1 bitmap does: ``key & 32767`` is ``(pfn
>> order) % 32768``), and after each change writes the touched leaves here, whole (its
``mirror``): one 4 KiB write per leaf touched rather than one per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import kho_radix
from liveupdate.abi.consts import PAGE_SIZE

if TYPE_CHECKING:
    from liveupdate.kernel.kho.mmops import MmOps


class RadixLive:
    def __init__(self, mm: MmOps) -> None:
        self.mm = mm
        self.root = self._node()
        self.tables: dict[int, np.ndarray] = {self.root: np.zeros(kho_radix.SLOTS, "<u8")}
        self.leaves: dict[int, int] = {}  # leaf id -> leaf page

    def _node(self) -> int:
        phys = self.mm.alloc_pages(0)
        self.mm.zero(phys, PAGE_SIZE)
        return phys

    @staticmethod
    def leaf_of(order: int, bitmap_index: int) -> int:
        """The leaf id of kho-v1 bitmap ``bitmap_index`` of ``order`` (32768-bit bitmaps)."""
        marker = 1 << (kho_radix.ORDER_0_LOG2 - order)
        return (marker >> kho_radix.BITMAP_SIZE_LOG2) | bitmap_index

    def _leaf_page(self, lid: int) -> int:
        page = self.leaves.get(lid)
        if page is not None:
            return page
        node = self.root
        slots = kho_radix.path(lid)
        for depth, slot in enumerate(slots):
            table = self.tables[node]
            if not table[slot]:
                child = self._node()
                table[slot] = child
                self.mm.write(node + slot * 8, int(child).to_bytes(8, "little"))
                if depth < len(slots) - 1:
                    self.tables[child] = np.zeros(kho_radix.SLOTS, "<u8")
            node = int(table[slot])
        self.leaves[lid] = node
        return node

    def write_leaf(self, order: int, bitmap_index: int, bits: np.ndarray) -> None:
        """The whole leaf for one kho-v1-sized bitmap (32768 bools)."""
        lid = self.leaf_of(order, bitmap_index)
        if lid not in self.leaves and not bits.any():
            return  # upstream's del never allocates
        self.mm.write(self._leaf_page(lid), kho_radix.leaf_bytes(bits))

    def pages(self) -> list[int]:
        return [*self.tables, *self.leaves.values()]
