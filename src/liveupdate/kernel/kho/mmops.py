"""What KHO needs from the rest of the kernel (the emulated ``Kernel`` provides it): page
allocation, RAM writes and the page metadata (``struct page``'s private word, where
``kho_preserved_memory_reserve`` leaves the preserved order for ``kho_restore_folio``)."""

from __future__ import annotations

from typing import Protocol

from liveupdate.abi.physmem import PhysMem
from liveupdate.kernel.mm.pages import PageMeta


class MmOps(Protocol):
    """What KHO needs from the rest of the kernel."""

    mem: PhysMem
    meta: PageMeta

    def alloc_pages(self, order: int) -> int: ...
    def free_pages(self, phys: int, order: int) -> None: ...
    def write(self, phys: int, data: bytes) -> None: ...
    def zero(self, phys: int, size: int) -> None: ...
