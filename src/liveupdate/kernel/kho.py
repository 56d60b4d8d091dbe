"""Kexec HandOver in the emulated kernel (kernel/liveupdate/kexec_handover.c, 6.19 semantics).

Outgoing (:class:`KhoOut`): the tracker is Linux's -- per order, bitmaps indexed by
``(pfn >> order) // BITS`` -- held as numpy arrays; the root FDT is built at boot in a
preserved page and edited live as subtrees come and go; :meth:`KhoOut.finalize` serializes
the memory map into freshly allocated, *not* preserved, chunk and bitmap pages.

Incoming (:func:`validate_handover`, :class:`KhoIn`): the whole handover is validated before
any of it is used -- root FDT, scratch array, every chunk and bitmap pointer, every preserved
block inside RAM and outside scratch, every subtree pointer inside RAM. This is stricter than
Linux, which checks the map only while reserving it; any failure makes the caller boot cold.

Upstream names, here: ``kho_preserve_folio/pages``, ``kho_unpreserve_folio/pages``,
``kho_preserve_vmalloc``, ``kho_unpreserve_vmalloc``, ``kho_alloc_preserve``,
``kho_unpreserve_free``, ``kho_add_subtree``, ``kho_remove_subtree``, ``kho_finalize`` are the
:class:`KhoOut` methods without the ``kho_`` prefix; ``kho_retrieve_subtree`` is
:meth:`KhoIn.retrieve_subtree`; ``kho_restore_folio/pages/vmalloc`` are the module functions
:func:`restore_folio`, :func:`restore_pages`, :func:`restore_vmalloc`; ``is_kho_boot`` is
``Kernel.is_kho_boot``. :meth:`KhoOut.preserve_blocks` and :func:`restore_folios` are bulk forms
(one numpy operation for many blocks) that Linux does not have.

Errors follow upstream: preserve -> EINVAL (scratch overlap, as CONFIG_KEXEC_HANDOVER_DEBUG
does; we always check), ENOMEM; ``kho_alloc_preserve`` -> EINVAL (size 0), E2BIG (order > 10);
``kho_add_subtree`` -> EEXIST, ENOMEM; ``kho_retrieve_subtree`` -> ENOENT; ``kho_finalize`` ->
EOPNOTSUPP when KHO is disabled; unpreserve once the reboot path has finalized -> EBUSY (the
6.17 ``kho_unpreserve_folio``/``_phys`` check ``if (kho_out.finalized) return -EBUSY``), which
is what makes the reboot path's "frozen means frozen" hold. A finalize through debugfs (for
inspection, 6.19 style) serializes the map but does not freeze the tracker: 6.19 dropped
those checks, and LUO may still cancel. Restore returns None where Linux
returns NULL (with a WARN).

The core (:mod:`liveupdate.kernel.kho_core`) decides the rest. On the 6.16/6.18 notifier cores
the root page is allocated at boot but written and preserved only by :meth:`KhoOut.finalize`,
which runs the ``KEXEC_KHO_FINALIZE`` notifiers components registered with
:meth:`KhoOut.publish` (``register_kho_notifier``) and builds the root sequentially,
children in registration order; while finalized every preserve is EBUSY (6.16
``kho_preserve_folio``); :meth:`KhoOut.abort` (``kho_abort``) throws the whole tracker away.
One deviation there: Linux leaves the stale tree in the (now unpreserved) root page after an
abort; we zero it, so a ``kho_sanitize=off`` kexec cannot revive chunks that were freed.

kho-v3/kho-v4 kernels (7.1, 7.2) track live in a radix tree in RAM
(:mod:`liveupdate.kernel.kho_radix`); the root FDT names its root node from boot, children
carry ``preserved-data`` and ``blob-size``, and "finalize" at reboot only closes the tracker.
``out_format`` is what the reboot writes: the kernel's own format, or -- negotiated
(:mod:`liveupdate.kernel.negotiate`) -- an older one: kho-v1 chunks with 4096- or 512-byte
bitmaps (the root is then rebuilt as kho-v1 with the same children, in the same order of
addition), or kho-v3 from a kho-v4 kernel (the same tree, the other root string).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from liveupdate.abi import bootparams, generations, kho, kho_memmap, kho_radix, vmalloc
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, get_order
from liveupdate.abi.kho_memmap import MAX_MAP_ORDER
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.kho_core import KhoCore
from liveupdate.kernel.kho_radix import RadixLive
from liveupdate.kernel.mm.buddy import block_orders
from liveupdate.kernel.mm.pages import KHO_PAGE_MAGIC, PageMeta


class MmOps(Protocol):
    """What KHO needs from the rest of the kernel."""

    mem: PhysMem
    meta: PageMeta

    def alloc_pages(self, order: int) -> int: ...
    def free_pages(self, phys: int, order: int) -> None: ...
    def write(self, phys: int, data: bytes) -> None: ...
    def zero(self, phys: int, size: int) -> None: ...


def overlaps_scratch(starts: np.ndarray, ends: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Which of the ``[start, end)`` blocks overlap any scratch area (a bool per block)."""
    starts, ends = np.asarray(starts, np.uint64), np.asarray(ends, np.uint64)
    hit = np.zeros(len(starts), bool)
    for a, s in bootparams.scratch_areas(scratch):
        if s:
            hit |= (starts < np.uint64(a + s)) & (ends > np.uint64(a))
    return hit


Notifier = Callable[["KhoOut"], None]
RAW_SUBTREES = frozenset({"kexec-metadata"})  # KHO's own raw blobs (kho-v3+)


class KhoOut:
    def __init__(self, mm: MmOps, scratch: np.ndarray, bitmap_bytes: int,
                 core: KhoCore, fmt: str = kho.KHO_FDT_COMPATIBLE) -> None:
        self.mm = mm
        self.format = generations.kho_format(fmt, bitmap_bytes)
        self.out_format = self.format  # what the reboot writes (negotiation may lower it)
        self.radix = RadixLive(mm) if kho.is_radix(fmt) else None
        self.scratch = scratch  # structured array of (addr, size)
        self.bitmap_bytes = bitmap_bytes
        self.bits_per = bitmap_bytes * 8
        self.core = core
        self.tracker: dict[int, dict[int, np.ndarray]] = {}
        self.finalized = False
        self.frozen = False  # nothing is unpreserved any more (reboot path; 6.16 finalize)
        self.mem_map = 0
        self.meta_pages: list[int] = []
        self.vmallocs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.root = kho.LiveRoot(fmt, self.radix.root if self.radix else 0)
        self.live_added: list[tuple[str, int, int]] = []  # live cores: (name, phys, size)
        self.notifiers: list[Notifier] = []
        self.sequential: list[tuple[str, int]] | None = None  # notifier cores, in finalize
        self.added: list[tuple[str, int]] = []  # notifier cores: this finalize's subtrees
        if core.notifiers:  # kho_init: alloc_page; written and preserved at finalize
            self.root_phys = self.mm.alloc_pages(0)
            self.mm.zero(self.root_phys, PAGE_SIZE)
        else:
            self.root_phys = self.alloc_preserve(PAGE_SIZE)
            self._flush_root()
        self.fdt_debugfs_size = len(self.root.blob)  # out/fdt's length, fixed at kho_init

    def _check_open(self) -> None:
        """6.16 ``kho_preserve_folio``/``_phys``: EBUSY once finalized (notifier cores)."""
        if self.core.notifiers and self.finalized:
            raise LiveUpdateError(err=errno.EBUSY, msg="KHO: finalized; abort first "
                                  "(echo 0 > kho/out/finalize)")

    # -- the tracker ----------------------------------------------------------------------
    def _check(self, phys: int, order: int, max_order: int = MAX_PAGE_ORDER) -> None:
        if not 0 <= order <= max_order or phys % (PAGE_SIZE << order):
            raise LiveUpdateError(err=errno.EINVAL, msg=f"KHO: bad block {phys:#x} order {order}")
        if overlaps_scratch(np.array([phys]), np.array([phys + (PAGE_SIZE << order)]),
                            self.scratch)[0]:
            raise LiveUpdateError(
                err=errno.EINVAL, msg=f"KHO: {phys:#x} order {order} overlaps scratch")

    def _bit(self, phys: int, order: int, value: bool) -> None:
        high = phys >> (PAGE_SHIFT + order)
        bitmaps = self.tracker.setdefault(order, {})
        idx = high // self.bits_per
        if idx not in bitmaps:
            if not value:
                return
            bitmaps[idx] = np.zeros(self.bits_per, bool)
        bitmaps[idx][high % self.bits_per] = value
        if self.radix is not None:
            self.radix.write_leaf(order, idx, bitmaps[idx])

    def preserve_folio(self, phys: int, order: int) -> None:
        self._check_open()
        self._check(phys, order)
        self._bit(phys, order, True)

    def _check_unfinalized(self, what: str) -> None:
        if self.frozen:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"{what}: KHO is finalized for the "
                                  "reboot")

    def unpreserve_folio(self, phys: int, order: int) -> None:
        self._check_unfinalized("kho_unpreserve_folio")
        self._bit(phys, order, False)

    def preserve_pages(self, phys: int, nr: int) -> None:
        """kho_preserve_pages: upstream's split has no MAX_PAGE_ORDER cap (see block_orders),
        so an aligned 16 MiB range is one order-12 block in the map."""
        self._check_open()
        blocks = block_orders(phys >> PAGE_SHIFT, (phys >> PAGE_SHIFT) + nr)
        for pfn, order in blocks:  # all checks first: nothing is half-preserved
            self._check(pfn << PAGE_SHIFT, order, MAX_MAP_ORDER)
        for pfn, order in blocks:
            self._bit(pfn << PAGE_SHIFT, order, True)

    def unpreserve_pages(self, phys: int, nr: int) -> None:
        self._check_unfinalized("kho_unpreserve_pages")
        for pfn, order in block_orders(phys >> PAGE_SHIFT, (phys >> PAGE_SHIFT) + nr):
            self._bit(pfn << PAGE_SHIFT, order, False)

    def preserve_blocks(self, phys: np.ndarray, order: np.ndarray) -> None:
        """Bulk preserve, vectorized (one array operation per bitmap touched)."""
        self._check_open()
        phys = np.asarray(phys, np.uint64)
        order = np.asarray(order, np.uint8)
        if len(order) and int(order.max()) > MAX_PAGE_ORDER:
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
            bitmaps = self.tracker.setdefault(o, {})
            for i in np.unique(idx).tolist():
                bm = bitmaps.setdefault(i, np.zeros(self.bits_per, bool))
                bm[(high[idx == i] % np.uint64(self.bits_per)).astype(np.int64)] = True
                if self.radix is not None:
                    self.radix.write_leaf(o, i, bm)

    def unpreserve_blocks(self, phys: np.ndarray, order: np.ndarray) -> None:
        """Bulk unpreserve, the symmetric pair of :meth:`preserve_blocks`."""
        self._check_unfinalized("kho_unpreserve_folio")
        phys = np.asarray(phys, np.uint64)
        order = np.asarray(order, np.uint8)
        for o in np.unique(order).tolist():
            high = phys[order == o] >> np.uint64(PAGE_SHIFT + o)
            idx = high // np.uint64(self.bits_per)
            bitmaps = self.tracker.get(o, {})
            for i in np.unique(idx).tolist():
                bm = bitmaps.get(i)
                if bm is not None:
                    bm[(high[idx == i] % np.uint64(self.bits_per)).astype(np.int64)] = False
                    if self.radix is not None:
                        self.radix.write_leaf(o, i, bm)

    def preserved(self) -> tuple[np.ndarray, np.ndarray]:
        """Every preserved block as (phys, order) arrays."""
        phys, order = [], []
        for o, bitmaps in sorted(self.tracker.items()):
            for i, bm in sorted(bitmaps.items()):
                high = np.flatnonzero(bm).astype(np.uint64) + np.uint64(i * self.bits_per)
                phys.append(high << np.uint64(PAGE_SHIFT + o))
                order.append(np.full(len(high), o, np.uint8))
        if not phys:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint8)
        return np.concatenate(phys), np.concatenate(order)

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
        self._check_open()
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

    # -- subtrees and the root ------------------------------------------------------------
    def _flush_root(self) -> None:
        self.mm.write(self.root_phys, self.root.blob.ljust(PAGE_SIZE, b"\0"))

    def publish(self, notifier: Notifier) -> None:
        """A component's "preserve, then add my subtree" step. Live cores (6.19+) run it
        now; notifier cores register it (``register_kho_notifier``) and run it at every
        finalize -- after an abort threw its preservations away, it preserves them again."""
        if self.core.notifiers:
            self.notifiers.append(notifier)
        else:
            notifier(self)

    def add_subtree(self, name: str, phys: int, size: int = 0) -> None:
        """kho_add_subtree; ``size`` is the blob's (kho-v3+ ``blob-size``; in kho-v1 the
        blob is an FDT that carries its own)."""
        if self.sequential is not None:  # 6.16-6.18: inside a KEXEC_KHO_FINALIZE notifier
            if any(n == name for n, _ in self.sequential):
                raise LiveUpdateError(err=errno.EEXIST, msg=f"kho_add_subtree({name}): exists")
            self.sequential.append((name, phys))
            return
        if self.core.notifiers:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_add_subtree({name}): only a "
                                  "KEXEC_KHO_FINALIZE notifier may add subtrees on this core")
        try:
            self.root.add_subtree(name, phys, size)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=f"kho_add_subtree({name}): {e.message}") from e
        self.live_added.append((name, phys, size))
        self._flush_root()

    def remove_subtree(self, phys: int) -> None:
        if not self.core.notifiers and self.root.remove_subtree(phys):
            self.live_added = [a for a in self.live_added if a[1] != phys]
            self._flush_root()

    def _reroot(self, fmt: str, mem_map: int) -> None:
        """The root in another format, same children added in the same order (negotiated
        handovers; the root page is the same)."""
        root = kho.LiveRoot(generations.KHO_COMPATIBLE[fmt], mem_map)
        for name, phys, size in self.live_added:
            if name in RAW_SUBTREES and not kho.is_radix(root.compatible):
                continue  # a raw blob has no place under a kho-v1 root (``fdt``)
            root.add_subtree(name, phys, size)
        self.root = root
        self._flush_root()

    def kept_pages(self) -> list[int]:
        """Metadata pages the next kernel reads but nobody preserved: kho-v1 chunks and
        bitmaps, radix nodes. The sanitizer keeps them."""
        return self.meta_pages + (self.radix.pages() if self.radix else [])

    def subtrees(self) -> tuple[tuple[str, int], ...]:
        if self.core.notifiers:
            return tuple(self.added)
        return kho.decode_root(self.root.blob).subtrees

    def root_blob(self) -> bytes:
        """The root FDT as the next kernel would read it (empty before a 6.16 finalize)."""
        if self.core.notifiers:
            return self.mm.mem.read_fdt(self.root_phys, "KHO root FDT") if self.finalized \
                else b""
        return self.root.blob

    # -- finalize -------------------------------------------------------------------------
    def finalize(self, *, freeze: bool = False) -> int:
        """Serialize the memory map (again); returns the map pointer. ``freeze`` (the reboot
        path) also refuses every later unpreserve. On notifier cores (6.16-6.18) this is the
        whole ``kho_finalize``: preserve the root page, run the notifiers, serialize, write
        the root sequentially; any failure aborts (``kho_abort``) and is returned."""
        if not self.core.notifiers:
            return self._serialize(freeze)
        if self.finalized:
            raise LiveUpdateError(err=errno.EEXIST, msg="KHO: already finalized")
        self.sequential = []
        try:
            self.preserve_folio(self.root_phys, 0)
            for notifier in self.notifiers:
                notifier(self)
            self.added = self.sequential
            self.sequential = None
            mem_map = self._serialize(True)
            self.mm.write(self.root_phys, kho.encode_root_sequential(mem_map, self.added)
                          .ljust(PAGE_SIZE, b"\0"))
        except LiveUpdateError:
            self.sequential = None
            self.abort()
            raise
        return mem_map

    def abort(self) -> None:
        """kho_abort (notifier cores): the tracker, the serialized map and every subtree are
        thrown away; components preserve again at the next finalize."""
        if not self.core.notifiers:
            raise LiveUpdateError(err=errno.EINVAL, msg="KHO: no abort on this core")
        self.tracker, self.vmallocs, self.added = {}, {}, []
        self._free_meta()
        self.mem_map = 0
        self.mm.zero(self.root_phys, PAGE_SIZE)
        self.finalized = self.frozen = False

    def _free_meta(self) -> None:
        for p in self.meta_pages:
            self.mm.free_pages(p, 0)
        self.meta_pages = []

    def _serialize(self, freeze: bool) -> int:
        self._free_meta()
        out = self.out_format
        if self.radix is not None and kho.is_radix(out):  # stateless: the tree is the map
            if generations.KHO_COMPATIBLE[out] != self.root.compatible:
                self._reroot(out, self.radix.root)
            self.mem_map = self.radix.root
            self.finalized, self.frozen = True, self.frozen or freeze
            return self.mem_map
        if self.radix is not None and self.root.compatible != kho.KHO_FDT_COMPATIBLE:
            self._reroot(out, 0)
        bitmap_bytes = kho_memmap.BITMAP_BYTES_6_16 if out == "kho-v1-512" else \
            kho_memmap.BITMAP_BYTES_6_18
        phys, order = self.preserved()
        bm = kho_memmap.build_bitmaps(phys, order, bitmap_bytes)
        # 6.16/6.17 bitmaps are kmalloc-512 objects: eight share a page, as here
        per_page = PAGE_SIZE // bitmap_bytes
        bitmap_pages = [self.mm.alloc_pages(0) for _ in range(-(-len(bm) // per_page))]
        chunk_pages = [self.mm.alloc_pages(0) for _ in range(bm.chunks_needed())]
        self.meta_pages = bitmap_pages + chunk_pages
        bitmap_phys = np.array([bitmap_pages[i // per_page] + (i % per_page) * bitmap_bytes
                                for i in range(len(bm))], np.uint64)
        for i, p in enumerate(bitmap_pages):
            self.mm.write(p, bm.bits[i * per_page : (i + 1) * per_page].tobytes()
                          .ljust(PAGE_SIZE, b"\0"))
        chunks = kho_memmap.encode_chunks(bm, bitmap_phys, np.array(chunk_pages, np.uint64))
        for p, page in zip(chunk_pages, chunks, strict=True):
            self.mm.write(p, page.tobytes())
        self.mem_map = chunk_pages[0] if chunk_pages else 0
        if not self.core.notifiers:
            self.root.set_mem_map(self.mem_map)
            self._flush_root()
        self.finalized, self.frozen = True, self.frozen or freeze
        return self.mem_map


# -- incoming -----------------------------------------------------------------------------

@dataclass
class KhoIn:
    fdt_phys: int
    fdt: bytes
    root: kho.KhoRoot
    scratch: np.ndarray
    scratch_phys: int
    scratch_len: int
    preserved: kho_memmap.PreservedMemory
    restored: int = 0
    sub_fdts: dict[str, bytes] = field(default_factory=dict)
    check_order: bool = True  # 6.18-7.0 kho_restore_page; 7.1+ checks only the magic

    def retrieve_subtree(self, name: str) -> int:
        """kho_retrieve_subtree: ENOENT if absent, EINVAL if its ``fdt`` is unusable."""
        try:
            return self.root.subtree(name)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=f"kho_retrieve_subtree({name}): {e.message}") \
                from e


def validate_handover(mem: PhysMem, kd: bootparams.KhoData, reads: tuple[str, ...], *,
                      require_map: bool = True) -> KhoIn:
    """Everything kho_populate and kho_mem_deserialize would meet, checked up front.

    ``reads`` are the KHO formats this kernel takes (``generations``: its own, or with
    negotiation every older one): the root's ``compatible`` must be one of them, exactly as
    ``kho_populate`` checks it. kho-v1 maps of the other bitmap size carry the same string; a
    Linux reader would misread them silently (spec/kho.md 0), we detect the size (3.1.4) and
    refuse one we do not read -- a deliberate deviation: a cold boot instead of corruption.

    Stricter than Linux where it protects memory: scratch areas inside RAM, page aligned and
    disjoint; every preserved block inside RAM and outside scratch; the chunk list and radix
    tree bounded. Never stricter where Linux's own output would be refused: zero-size
    scratch entries (``kho_reserve_scratch`` allocates them), FDT sizes other than a page,
    and children whose blob property is missing, misshapen or outside RAM -- those fail only
    their own ``kho_retrieve_subtree`` (EINVAL), as in Linux, and only if someone asks.
    ``require_map``: 6.19+ ``kho_populate`` refuses a zero kho-v1 ``preserved-memory-map``
    (ENOENT); 6.16-6.18 take it as an empty map.
    """
    # kho_populate maps fdt_len bytes and checks the header; any fdt_len will do (6.16 passes
    # a page, later kernels may not), but no more than it and the FDT's own totalsize is read
    blob = mem.read_fdt(kd.fdt_addr, "KHO root FDT", limit=kd.fdt_size)
    accept = tuple(dict.fromkeys(generations.KHO_COMPATIBLE[f] for f in reads))
    root = kho.decode_root(blob, accept=accept, require_map=require_map, ram=mem.contains)
    scratch = bootparams.decode_scratch(mem.read(kd.scratch_addr, kd.scratch_size,
                                                 "KHO scratch array"))
    for a, s in bootparams.scratch_areas(scratch):
        if s == 0:
            continue
        if a % PAGE_SIZE or s % PAGE_SIZE:
            raise AbiError(msg=f"scratch area {a:#x}+{s:#x} is not page aligned")
        mem.check(a, s, "KHO scratch area")
    used = scratch[scratch["size"] > 0]
    order = np.argsort(used["addr"])
    sa, ss = used["addr"][order], used["size"][order]
    if np.any(sa[1:] < sa[:-1] + ss[:-1]):
        raise AbiError(msg="KHO scratch areas overlap")
    if len(used) == 0:
        raise AbiError(msg="KHO scratch array has no non-empty area")
    if kho.is_radix(root.compatible):
        pm = kho_radix.decode(mem, root.mem_map)
    else:
        pm = kho_memmap.decode_mem_map(mem, root.mem_map)  # the bitmap size detected
        fmt = generations.kho_format(kho.KHO_FDT_COMPATIBLE, pm.bitmap_bytes)
        if fmt not in reads:
            raise AbiError(msg=f"kho-v1 map with {pm.bitmap_bytes}-byte bitmaps ({fmt}); this "
                           f"kernel reads {', '.join(reads)} (Linux would misread it "
                           "silently)")
    ends = pm.phys + (np.uint64(PAGE_SIZE) << pm.order.astype(np.uint64))
    inside = np.zeros(len(pm), bool)
    for s, n in mem.ranges:
        inside |= (pm.phys >= np.uint64(s)) & (ends <= np.uint64(s + n))
    if not np.all(inside):
        bad = int(pm.phys[~inside][0])
        raise AbiError(msg=f"preserved block {bad:#x} lies outside RAM")
    hit = overlaps_scratch(pm.phys, ends, scratch)
    if np.any(hit):
        raise AbiError(msg=f"preserved block {int(pm.phys[hit][0]):#x} overlaps scratch")
    return KhoIn(kd.fdt_addr, blob, root, scratch, kd.scratch_addr, kd.scratch_size, pm)


def restore_folio(kin: KhoIn, meta: PageMeta, phys: int) -> int | None:
    """kho_restore_folio: the order, or None if ``phys`` is not a preserved head page."""
    pfn = phys >> PAGE_SHIFT
    if not meta.pfn_valid(pfn):
        return None
    info = int(meta.private[pfn])
    order = info & 0xFFFFFFFF
    if info >> 32 != KHO_PAGE_MAGIC or (kin.check_order and order > MAX_PAGE_ORDER):
        return None
    meta.private[pfn] = 0
    meta.refcount[pfn : pfn + (1 << order)] = 0
    meta.refcount[pfn] = 1
    meta.order[pfn] = order
    kin.restored += 1 << order
    return order


def restore_free(kin: KhoIn | None, mm: MmOps, phys: int) -> bool:
    """kho_restore_free: take back a preserved allocation the next kernel has read, and free
    it. False (nothing freed) if ``phys`` is not a preserved head page -- or there was no
    handover -- and it stays as it is."""
    order = None if kin is None else restore_folio(kin, mm.meta, phys)
    if order is None:
        return False
    mm.free_pages(phys, order)
    return True


def restore_folios(kin: KhoIn, meta: PageMeta, phys: np.ndarray, order: int) -> np.ndarray:
    """Bulk kho_restore_folio of same-order folios; returns which ones were restored."""
    pfn = (np.asarray(phys, np.uint64) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    ok = (pfn >= 0) & (pfn < meta.nr_pages)
    want = np.uint64(order | KHO_PAGE_MAGIC << 32)
    ok[ok] = meta.private[pfn[ok]] == want
    good = pfn[ok]
    meta.private[good] = 0
    meta.order[good] = order
    if len(good):  # every page of every folio at once, then the heads
        meta.refcount[(good[:, None] + np.arange(1 << order)).ravel()] = 0
    meta.refcount[good] = 1
    kin.restored += len(good) << order
    return ok


def restore_vmalloc(kin: KhoIn, meta: PageMeta, mem: PhysMem,
                    desc: vmalloc.KhoVmalloc) -> vmalloc.VmallocArea | None:
    """kho_restore_vmalloc: validate the chunk chain, restore every block as pages and the
    chunk pages themselves (which the caller then frees). None if any page is not a preserved
    block of the right order -- nothing is restored then."""
    try:
        area = vmalloc.decode(mem, desc)
    except AbiError:
        return None
    nr = 1 << desc.order
    for p in np.concatenate([area.chunk_phys, area.block_phys]).tolist():
        pfn = p >> PAGE_SHIFT
        info = int(meta.private[pfn]) if meta.pfn_valid(pfn) else 0
        if info >> 32 != KHO_PAGE_MAGIC or info & 0xFFFFFFFF != (
                0 if p in area.chunk_phys else desc.order):
            return None
    for p in area.chunk_phys.tolist():
        restore_folio(kin, meta, p)
    for p in area.block_phys.tolist():
        restore_pages(kin, meta, p, nr)
    return area


def restore_pages(kin: KhoIn, meta: PageMeta, phys: int, nr: int) -> bool:
    """kho_restore_pages: mirror the preserve call's split; all or nothing."""
    blocks = block_orders(phys >> PAGE_SHIFT, (phys >> PAGE_SHIFT) + nr)
    for pfn, order in blocks:
        info = int(meta.private[pfn]) if meta.pfn_valid(pfn) else 0
        if info >> 32 != KHO_PAGE_MAGIC or info & 0xFFFFFFFF != order:
            return False
    for pfn, order in blocks:
        restore_folio(kin, meta, pfn << PAGE_SHIFT)
        meta.refcount[pfn : pfn + (1 << order)] = 1  # pages, not a folio: each page is 1
    return True
