"""The outgoing side of Kexec HandOver (kernel/liveupdate/kexec_handover.c): what this kernel
preserves for the next one, the subtrees it names, and the map it finalizes.

Upstream names, here: ``kho_preserve_folio/pages``, ``kho_unpreserve_folio/pages``,
``kho_preserve_vmalloc``, ``kho_unpreserve_vmalloc``, ``kho_alloc_preserve``,
``kho_unpreserve_free``, ``kho_add_subtree``, ``kho_remove_subtree``, ``kho_finalize``,
``kho_abort`` are the :class:`KhoOut` methods without the ``kho_`` prefix; their symmetric
pairs on the next kernel, ``kho_restore_*``, are the methods of
:class:`liveupdate.kernel.kho.incoming.KhoIn`. :meth:`KhoOut.preserve_blocks` is a bulk form
(one numpy operation for many blocks) that Linux does not have.

Errors follow upstream: preserve -> EINVAL (scratch overlap, as CONFIG_KEXEC_HANDOVER_DEBUG
does; we always check), ENOMEM; ``kho_alloc_preserve`` -> EINVAL (size 0), E2BIG (order > 10);
``kho_add_subtree`` -> EEXIST, ENOMEM; ``kho_finalize`` -> EOPNOTSUPP when KHO is disabled;
unpreserve once the reboot path has finalized -> EBUSY (the 6.17 ``kho_unpreserve_folio``/
``_phys`` check ``if (kho_out.finalized) return -EBUSY``), which is what makes the reboot
path's "frozen means frozen" hold. A finalize through debugfs (for inspection, 6.19 style)
serializes the map but does not freeze the tracker: 6.19 dropped those checks, and LUO may
still cancel.

What differs between cores -- when the root is written, who may add subtrees, whether
preserves are refused while finalized, what finalize and abort do -- is the root strategy
(:mod:`liveupdate.kernel.kho.roots`) the core chose. ``out_format`` is what the reboot writes:
the kernel's own format, or -- negotiated (:mod:`liveupdate.kernel.negotiate`) -- an older
one.
"""

from __future__ import annotations

import errno

import numpy as np

from liveupdate.abi import generations, vmalloc
from liveupdate.abi import kho as kho_abi
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SIZE, get_order
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.kho import serialize
from liveupdate.kernel.kho.core import KhoCore
from liveupdate.kernel.kho.mmops import MmOps
from liveupdate.kernel.kho.roots import Notifier
from liveupdate.kernel.kho.tracker import Tracker


class KhoOut:
    def __init__(self, mm: MmOps, scratch: np.ndarray, bitmap_bytes: int,
                 core: KhoCore, fmt: str = kho_abi.KHO_FDT_COMPATIBLE) -> None:
        self.mm = mm
        self.core = core
        self.format = generations.kho_format(fmt, bitmap_bytes)
        self.out_format = self.format  # what the reboot writes (negotiation may lower it)
        self.scratch = scratch  # structured array of (addr, size)
        self.bitmap_bytes = bitmap_bytes
        self.finalized = False
        self.frozen = False  # nothing is unpreserved any more (reboot path; 6.16 finalize)
        self.mem_map = 0
        self.meta_pages: list[int] = []
        self.vmallocs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.strategy = core.root(self)  # the radix tree, if any, is allocated first
        self.radix = self.strategy.radix
        self.tracker = Tracker(bitmap_bytes, scratch,
                               None if self.radix is None else self.radix.write_leaf)
        self.root = kho_abi.LiveRoot(fmt, 0 if self.radix is None else self.radix.root)
        self.root_phys = self.strategy.start()
        self.fdt_debugfs_size = len(self.root.blob)  # out/fdt's length, fixed at kho_init

    # -- the tracker ----------------------------------------------------------------------
    def _check_unfinalized(self, what: str) -> None:
        if self.frozen:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"{what}: KHO is finalized for the "
                                  "reboot")

    def preserve_folio(self, phys: int, order: int) -> None:
        self.strategy.check_open()
        self.tracker.add(phys, order)

    def unpreserve_folio(self, phys: int, order: int) -> None:
        self._check_unfinalized("kho_unpreserve_folio")
        self.tracker.remove(phys, order)

    def preserve_pages(self, phys: int, nr: int) -> None:
        self.strategy.check_open()
        self.tracker.add_pages(phys, nr)

    def unpreserve_pages(self, phys: int, nr: int) -> None:
        self._check_unfinalized("kho_unpreserve_pages")
        self.tracker.remove_pages(phys, nr)

    def preserve_blocks(self, phys: np.ndarray, order: np.ndarray,
                        max_order: int = MAX_PAGE_ORDER) -> None:
        """Bulk preserve, vectorized (one array operation per bitmap touched)."""
        self.strategy.check_open()
        self.tracker.add_blocks(phys, order, max_order)

    def unpreserve_blocks(self, phys: np.ndarray, order: np.ndarray) -> None:
        """Bulk unpreserve, the symmetric pair of :meth:`preserve_blocks`."""
        self._check_unfinalized("kho_unpreserve_folio")
        self.tracker.remove_blocks(phys, order)

    def preserved(self) -> tuple[np.ndarray, np.ndarray]:
        """Every preserved block as (phys, order) arrays."""
        return self.tracker.preserved()

    # -- preserved allocations ------------------------------------------------------------
    def alloc_preserve(self, size: int) -> int:
        if size <= 0:
            raise LiveUpdateError(err=errno.EINVAL, msg="kho_alloc_preserve: size 0")
        order = get_order(size)
        if order > MAX_PAGE_ORDER:
            raise LiveUpdateError(
                err=errno.E2BIG, msg=f"kho_alloc_preserve: {size} bytes is too big")
        phys = self.mm.alloc_pages(order)
        self.mm.zero(phys, PAGE_SIZE << order)
        try:
            self.preserve_folio(phys, order)
        except LiveUpdateError:
            self.mm.free_pages(phys, order)
            raise
        return phys

    def store_again(self, data: bytes, phys: int | None) -> int:
        """:meth:`store` for a notifier: the first finalize allocates, a finalize after an
        abort preserves the same folio again (its bytes are still there)."""
        if phys is None:
            return self.store(data)
        self.preserve_folio(phys, get_order(len(data)))
        return phys

    def unpreserve_free(self, phys: int, size: int) -> None:
        order = get_order(size)
        self.unpreserve_folio(phys, order)
        self.mm.free_pages(phys, order)

    def store(self, data: bytes) -> int:
        """kho_alloc_preserve + copy: a preserved folio holding ``data``."""
        phys = self.alloc_preserve(len(data))
        self.mm.write(phys, data)
        return phys

    def _pages(self, n: int) -> np.ndarray:
        return np.array([self.mm.alloc_pages(0) for _ in range(n)], np.uint64)

    def preserve_vmalloc(self, data: bytes) -> vmalloc.KhoVmalloc:
        """Preserve ``data`` as a vmalloc area of order-0 pages (kho_preserve_vmalloc)."""
        self.strategy.check_open()
        nblocks, nchunks = vmalloc.pages_needed(len(data))
        lay = vmalloc.layout(data, self._pages(nblocks), self._pages(nchunks))
        for p, page in lay.pages:
            self.mm.write(p, page)
        self.preserve_blocks(lay.all_pages(), np.zeros(len(lay.pages), np.uint8))
        self.vmallocs[lay.desc.first] = (lay.blocks, lay.chunks)
        return lay.desc

    def unpreserve_vmalloc(self, desc: vmalloc.KhoVmalloc, free: bool = True) -> None:
        self._check_unfinalized("kho_unpreserve_vmalloc")
        blocks, chunks = self.vmallocs.pop(desc.first)
        for p in np.concatenate([blocks, chunks]).tolist():
            self.unpreserve_folio(p, 0)
            if free:
                self.mm.free_pages(p, 0)

    # -- subtrees and the root: the core's strategy ---------------------------------------
    def publish(self, notifier: Notifier) -> None:
        """A component's "preserve, then add my subtree" step: run now (6.19+) or at every
        finalize (6.16-6.18, ``register_kho_notifier``)."""
        self.strategy.publish(notifier)

    @property
    def in_finalize(self) -> bool:
        """Inside a ``KEXEC_KHO_FINALIZE`` notifier: a failure there fails the finalize."""
        return self.strategy.in_finalize

    def add_subtree(self, name: str, phys: int, size: int = 0) -> None:
        """kho_add_subtree; ``size`` is the blob's (kho-v3+ ``blob-size``; in kho-v1 the
        blob is an FDT that carries its own)."""
        self.strategy.add_subtree(name, phys, size)

    def remove_subtree(self, phys: int) -> None:
        self.strategy.remove_subtree(phys)

    def subtrees(self) -> tuple[tuple[str, int], ...]:
        return self.strategy.subtrees()

    def root_blob(self) -> bytes:
        """The root FDT as the next kernel would read it (empty before a 6.16 finalize)."""
        return self.strategy.blob()

    def kept_pages(self) -> list[int]:
        """Metadata pages the next kernel reads but nobody preserved: kho-v1 chunks and
        bitmaps, radix nodes. The sanitizer keeps them."""
        return self.meta_pages + ([] if self.radix is None else self.radix.pages())

    # -- finalize -------------------------------------------------------------------------
    def finalize(self, *, freeze: bool = False) -> int:
        """Serialize the memory map (again); returns the map pointer. ``freeze`` (the reboot
        path) also refuses every later unpreserve. On notifier cores (6.16-6.18) this is the
        whole ``kho_finalize``: notifiers, map, root; any failure aborts and is returned."""
        return self.strategy.finalize(freeze)

    def abort(self) -> None:
        """kho_abort (notifier cores; EINVAL elsewhere)."""
        self.strategy.abort()

    def free_map(self) -> None:
        """Free the pages of the last serialized map (the next one replaces it)."""
        for p in self.meta_pages:
            self.mm.free_pages(p, 0)
        self.meta_pages = []

    def write_map(self, fmt: str) -> int:
        """Serialize the tracker as a kho-v1 ``fmt`` map in fresh pages; its first chunk."""
        self.free_map()
        phys, order = self.preserved()
        mem_map, self.meta_pages = serialize.write_map(self.mm, phys, order, fmt)
        return mem_map

    def close(self, mem_map: int, freeze: bool) -> int:
        """Finalized with ``mem_map``; frozen too if ``freeze`` (or already)."""
        self.mem_map = mem_map
        self.finalized, self.frozen = True, self.frozen or freeze
        return mem_map

    def reset(self) -> None:
        """kho_abort's state: nothing preserved, no map, the root page zeroed."""
        self.tracker.clear()
        self.vmallocs = {}
        self.free_map()
        self.mem_map = 0
        self.mm.zero(self.root_phys, PAGE_SIZE)
        self.finalized = self.frozen = False
