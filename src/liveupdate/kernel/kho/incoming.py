"""The incoming side of Kexec HandOver: the handover this kernel booted with, validated
(:func:`liveupdate.kernel.kho.validate.validate_handover`), and the restore calls that take
preserved memory back -- the symmetric pairs of the outgoing preserve calls.

Upstream names, here: ``kho_retrieve_subtree``, ``kho_restore_folio``, ``kho_restore_pages``,
``kho_restore_vmalloc``, ``kho_restore_free`` are the :class:`KhoIn` methods without the
``kho_`` prefix; ``is_kho_boot`` is ``Kernel.is_kho_boot``. :meth:`KhoIn.restore_folios` is a
bulk form (one numpy operation for many folios) that Linux does not have. Restore returns None
(or False) where Linux returns NULL (with a WARN).

Whether a page is a preserved head page, and of which order, is answered in one place,
:meth:`KhoIn.preserved_orders` (``kho_restore_page``'s magic check on the ``struct page``
that ``kho_preserved_memory_reserve`` marked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from liveupdate.abi import bootparams, kho, kho_memmap, vmalloc
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SHIFT
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.kho.core import KhoCore
from liveupdate.kernel.kho.mmops import MmOps
from liveupdate.kernel.mm.buddy import block_orders
from liveupdate.kernel.mm.pages import KHO_PAGE_MAGIC

NOT_PRESERVED = -1


SLICED_ORDER = 6  # from 64 pages a folio, a slice per run beats one fancy index


@dataclass
class KhoIn:
    mm: MmOps
    core: KhoCore  # this kernel's: how strict kho_restore_page is
    fdt_phys: int
    fdt: bytes
    root: kho.KhoRoot
    scratch: np.ndarray
    scratch_phys: int
    scratch_len: int
    preserved: kho_memmap.PreservedMemory
    restored: int = 0
    sub_fdts: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, mm: MmOps, core: KhoCore, kd: bootparams.KhoData, fdt: bytes,
           root: kho.KhoRoot, scratch: np.ndarray,
           preserved: kho_memmap.PreservedMemory) -> KhoIn:
        return cls(mm, core, kd.fdt_addr, fdt, root, scratch, kd.scratch_addr, kd.scratch_size,
                   preserved)

    def retrieve_subtree(self, name: str) -> int:
        """kho_retrieve_subtree: ENOENT if absent, EINVAL if its ``fdt`` is unusable."""
        try:
            return self.root.subtree(name)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=f"kho_retrieve_subtree({name}): {e.message}") \
                from e

    # -- is it a preserved head page ------------------------------------------------------
    def preserved_orders(self, pfn: np.ndarray) -> np.ndarray:
        """The order each pfn was preserved with (int64), :data:`NOT_PRESERVED` where it is
        not a preserved head page: outside the memmap, a tail page, never preserved, or
        already restored (restore clears the mark)."""
        meta = self.mm.meta
        pfn = np.asarray(pfn, np.int64)
        out = np.full(len(pfn), NOT_PRESERVED, np.int64)
        valid = (pfn >= 0) & (pfn < meta.nr_pages)
        info = meta.private[pfn[valid]]
        order = (info & np.uint64(0xFFFFFFFF)).astype(np.int64)
        out[valid] = np.where(info >> np.uint64(32) == np.uint64(KHO_PAGE_MAGIC), order,
                              NOT_PRESERVED)
        return out

    def _order_of(self, phys: int) -> int:
        return int(self.preserved_orders(np.array([phys >> PAGE_SHIFT]))[0])

    # -- restore --------------------------------------------------------------------------
    def restore_folio(self, phys: int) -> int | None:
        """kho_restore_folio: the order, or None if ``phys`` is not a preserved head page
        (6.18-7.0 also refuse an order above MAX_PAGE_ORDER; 7.1+ check only the magic)."""
        order = self._order_of(phys)
        if order == NOT_PRESERVED or (self.core.restore_caps_order and order > MAX_PAGE_ORDER):
            return None
        pfn, meta = phys >> PAGE_SHIFT, self.mm.meta
        meta.private[pfn] = 0
        meta.refcount[pfn : pfn + (1 << order)] = 0
        meta.refcount[pfn] = 1
        meta.order[pfn] = order
        self.restored += 1 << order
        return order

    def restore_folios(self, phys: np.ndarray, order: int) -> np.ndarray:
        """Bulk kho_restore_folio of same-order folios; returns which ones were restored."""
        pfn = (np.asarray(phys, np.uint64) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        ok: np.ndarray = self.preserved_orders(pfn) == order
        good, meta = pfn[ok], self.mm.meta
        meta.private[good] = 0
        meta.order[good] = order
        if order >= SLICED_ORDER:  # every page of every folio (prep_compound_page touches
            runs = kho_memmap.merge_intervals(good, good + (1 << order))  # each tail too):
            for first, end in runs.tolist():  # a memset per run of adjacent folios
                meta.refcount[first:end] = 0
        elif len(good):  # small folios: all pages at once
            meta.refcount[(good[:, None] + np.arange(1 << order)).ravel()] = 0
        meta.refcount[good] = 1
        self.restored += len(good) << order
        return ok

    def restore_pages(self, phys: int, nr: int) -> bool:
        """kho_restore_pages: mirror the preserve call's split; all or nothing."""
        blocks = block_orders(phys >> PAGE_SHIFT, (phys >> PAGE_SHIFT) + nr)
        pfns = np.array([pfn for pfn, _ in blocks], np.int64)
        if np.any(self.preserved_orders(pfns) != [order for _, order in blocks]):
            return False
        for pfn, order in blocks:
            self.restore_folio(pfn << PAGE_SHIFT)
            self.mm.meta.refcount[pfn : pfn + (1 << order)] = 1  # pages: each page is 1
        return True

    def restore_vmalloc(self, desc: vmalloc.KhoVmalloc) -> vmalloc.VmallocArea | None:
        """kho_restore_vmalloc: validate the chunk chain, restore every block as pages and the
        chunk pages themselves (which the caller then frees). None if any page is not a
        preserved block of the right order -- nothing is restored then."""
        try:
            area = vmalloc.decode(self.mm.mem, desc)
        except AbiError:
            return None
        pages = np.concatenate([area.chunk_phys, area.block_phys]).astype(np.uint64)
        want = np.concatenate([np.zeros(len(area.chunk_phys), np.int64),
                               np.full(len(area.block_phys), desc.order, np.int64)])
        want[np.isin(pages, area.chunk_phys)] = 0  # a page that is both: a chunk (order 0)
        if np.any(self.preserved_orders((pages >> np.uint64(PAGE_SHIFT)).astype(np.int64))
                  != want):
            return None
        for p in area.chunk_phys.tolist():
            self.restore_folio(p)
        for p in area.block_phys.tolist():
            self.restore_pages(p, 1 << desc.order)
        return area

    def restore_free(self, phys: int) -> bool:
        """kho_restore_free: take back a preserved allocation the next kernel has read, and
        free it. False (nothing freed) if ``phys`` is not a preserved head page; it stays as
        it is."""
        order = self.restore_folio(phys)
        if order is None:
            return False
        self.mm.free_pages(phys, order)
        return True


def restore_free(kin: KhoIn | None, phys: int) -> bool:
    """:meth:`KhoIn.restore_free` where there may be no handover (False then)."""
    return kin is not None and kin.restore_free(phys)
