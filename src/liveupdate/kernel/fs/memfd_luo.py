"""memfd's LUO handlers (``mm/memfd_luo.c``), beside the memfd they preserve.

The machinery is shared by every generation: preserving pins the file (a reference), fills
every hole with a zeroed folio (``memfd_pin_folios`` allocates holes: a sparse file becomes
fully allocated, visible in ``st_blocks``), freezes the size and preserves each folio with
KHO -- by reference, never copying a byte (invariant 2). Retrieving restores each folio
(``kho_restore_folio``: its order comes from the page's KHO metadata) into a new memfd whose
size and position are the preserved ones; an entry whose PFN is 0 is skipped, as upstream
does on retrieve, finish and unpreserve. ``finish`` of a file never retrieved restores and
frees its folios. Only the serialized format differs between generations:

* :class:`MemfdSerHandler` -- mainline: ``memfd-v1`` (6.19) / ``memfd-v2`` (7.1) structs with
  the folio array in KHO vmalloc; heavy work at PRESERVE_FD.
* :class:`MemfdFdtHandler` -- the v3 era ``memfd-v1`` FDT (``pos``, ``size``, ``folios``
  array of ``foliodesc = pfn << 12 | flags``, ``index``), in one allocation of order
  ``get_order(PAGE_ALIGN(16 n) + PAGE_SIZE)``. That allocation is ``__get_free_pages``: past
  ``MAX_PAGE_ORDER`` (4 KiB folios of a 1 GiB memfd need order 11) it fails with ENOMEM and
  the prepare rolls back -- a real limit of that era. ``freeze`` rewrites ``pos``.

Every incoming record is hostile until checked: the FDT decodes under the abi gate, folio
ranges must lie inside the file and not overlap, and every PFN must be a preserved head page
of this boot's handover (else EIO, with everything already restored given back).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import memfd as memfd_abi
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, get_order
from liveupdate.abi.vmalloc import KhoVmalloc
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel import kho, negotiate
from liveupdate.kernel.fs import memfd
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.mm.pages import KHO_PAGE_MAGIC

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

UINT_MAX = (1 << 32) - 1
FOLIO_FLAGS = memfd_abi.FOLIO_DIRTY | memfd_abi.FOLIO_UPTODATE


class MemfdLuo:
    """What every memfd handler does; subclasses add their serialized format."""

    def __init__(self, k: Kernel) -> None:
        self.k = k

    def can_preserve(self, f: File) -> bool:
        return isinstance(f.private, memfd.Memfd)  # unlinked shmem: every memfd

    # -- outgoing -------------------------------------------------------------------------
    def pin(self, m: memfd.Memfd) -> None:
        if -(-m.size // PAGE_SIZE) > UINT_MAX:
            raise LiveUpdateError(err=errno.E2BIG, msg="memfd: more than UINT_MAX pages")
        m.populate(0, -(-m.size // PAGE_SIZE))  # holes become zeroed folios
        self.k.require_kho().preserve_blocks(m.phys, m.order)
        m.frozen = True
        m.get()

    def unpin(self, m: memfd.Memfd) -> None:
        self.k.require_kho().unpreserve_blocks(m.phys, m.order)
        m.frozen = False
        m.put()

    def folios(self, m: memfd.Memfd) -> memfd_abi.Folios:
        return memfd_abi.Folios(m.phys >> np.uint64(PAGE_SHIFT),
                                np.full(len(m.phys), FOLIO_FLAGS, np.uint16),
                                m.index.astype(np.uint64))

    def store(self, blob: bytes, size: int) -> int:
        """A preserved allocation of ``size`` bytes holding ``blob`` (``__get_free_pages``
        plus ``kho_preserve_folio``): ENOMEM past MAX_PAGE_ORDER."""
        order = get_order(size)
        if order > MAX_PAGE_ORDER:
            raise LiveUpdateError(err=errno.ENOMEM, msg=f"memfd: {size} bytes of metadata "
                                  f"need an order-{order} allocation (max {MAX_PAGE_ORDER})")
        phys = self.k.alloc_pages(order)
        self.k.zero(phys, PAGE_SIZE << order)
        self.k.write(phys, blob)
        self.k.require_kho().preserve_folio(phys, order)
        return phys

    def drop(self, phys: int, size: int) -> None:
        order = get_order(size)
        self.k.require_kho().unpreserve_folio(phys, order)
        self.k.free_pages(phys, order)

    # -- incoming -------------------------------------------------------------------------
    def restore_folios(self, folios: memfd_abi.Folios, size: int) -> memfd.Memfd:
        """A new memfd owning the preserved folios; EIO (nothing kept) if any is not a
        preserved head page or the folios do not fit the file."""
        kin, meta = self.k.kho_in, self.k.meta
        if kin is None:
            raise LiveUpdateError(err=errno.EIO, msg="memfd: no incoming KHO data")
        keep = folios.pfn != 0
        pfn = folios.pfn[keep].astype(np.int64)
        index = folios.index[keep].astype(np.int64)
        if np.any(pfn >= meta.nr_pages):
            raise LiveUpdateError(err=errno.EIO, msg="memfd: a folio lies outside RAM")
        info = meta.private[pfn]
        if np.any(info >> np.uint64(32) != np.uint64(KHO_PAGE_MAGIC)):
            raise LiveUpdateError(err=errno.EIO, msg="memfd: a folio was not preserved")
        order = (info & np.uint64(0xFFFFFFFF)).astype(np.uint8)
        ends = index + (np.int64(1) << order.astype(np.int64))
        srt = np.argsort(index)
        if (np.any(order > MAX_PAGE_ORDER) or np.any(ends > -(-size // PAGE_SIZE))
                or np.any(index[srt][1:] < ends[srt][:-1])):
            raise LiveUpdateError(err=errno.EIO, msg="memfd: folios overlap or pass the end")
        phys = pfn.astype(np.uint64) << np.uint64(PAGE_SHIFT)
        done = np.zeros(len(pfn), bool)
        for o in np.unique(order).tolist():
            sel = order == o
            done[sel] = kho.restore_folios(kin, meta, phys[sel], o)
        if not np.all(done):  # give back what was taken: the file is dropped
            for p, o in zip(phys[done].tolist(), order[done].tolist(), strict=True):
                self.k.free_pages(p, o)
            raise LiveUpdateError(err=errno.EIO, msg="memfd: kho_restore_folio failed")
        m = self.k.new_memfd("")
        m.size = size
        m.adopt(index, phys, order)
        return m

    def take_meta(self, phys: int) -> bytes:
        """Take back a preserved metadata allocation: its bytes, and the pages freed."""
        kin = self.k.kho_in
        order = None if kin is None else kho.restore_folio(kin, self.k.meta, phys)
        if order is None:
            raise LiveUpdateError(err=errno.EIO,
                                  msg=f"memfd: metadata at {phys:#x} was not preserved")
        blob = self.k.read(phys, PAGE_SIZE << order)
        self.k.free_pages(phys, order)
        return blob

    def free_unretrieved(self, folios: memfd_abi.Folios, size: int) -> None:
        try:
            m = self.restore_folios(folios, size)
        except LiveUpdateError as e:
            self.k.printk(f"memfd: finish: {e.message}; preserved pages stay reserved")
            return
        m.get()
        m.put()  # the last reference: the folios go back to the page allocator


class MemfdFdtHandler(MemfdLuo):
    """The v3 era handler: ``memfd-v1`` FDT, heavy work at PREPARE."""

    compatible = memfd_abi.MEMFD_V1

    def _encode(self, f: File) -> tuple[bytes, int]:
        m = f.private
        folios = self.folios(m)
        return (memfd_abi.encode_fdt(memfd_abi.MemfdState(f.pos, m.size, folios)),
                memfd_abi.fdt_alloc_size(len(folios)))

    def preserve(self, f: File) -> int:
        self.pin(f.private)
        try:
            blob, size = self._encode(f)
            return self.store(blob, size)
        except (LiveUpdateError, AbiError):
            self.unpin(f.private)
            raise

    def unpreserve(self, f: File, data: int) -> None:
        self.drop(data, memfd_abi.fdt_alloc_size(len(f.private.index)))
        self.unpin(f.private)

    def freeze(self, f: File, data: int) -> int:
        blob, _ = self._encode(f)  # the same folios: the same size; only pos changes
        self.k.write(data, blob)
        return data

    def unfreeze(self, f: File, data: int) -> None:
        """Nothing to undo: the FDT with a newer pos is still a valid preservation."""

    def _take_state(self, data: int) -> memfd_abi.MemfdState:
        blob = self.take_meta(data)
        try:
            return memfd_abi.decode_fdt(blob)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=e.message) from e

    def retrieve(self, data: int) -> File:
        st = self._take_state(data)
        return memfd.open_file(self.restore_folios(st.folios, st.size), st.pos)

    def finish(self, data: int, retrieved: File | None) -> None:
        if retrieved is not None:
            return  # retrieve took the folios and freed the FDT
        try:
            st = self._take_state(data)
        except LiveUpdateError as e:
            self.k.printk(f"memfd: finish: {e.message}; preserved pages stay reserved")
            return
        self.free_unretrieved(st.folios, st.size)


class MemfdSerHandler(MemfdLuo):
    """The mainline handler: ``struct memfd_luo_ser`` (``memfd-v1`` in 6.19, 40 bytes;
    ``memfd-v2`` in 7.1, 48 bytes with the seals) in a ``kho_alloc_preserve`` page, the folio
    array (``pfn:52 | flags:12``, ``index``) in a KHO vmalloc area. Heavy work at PRESERVE_FD;
    ``freeze`` rewrites ``pos``. v1 retrieves an unsealable memfd (``F_SEAL_SEAL`` set); v2
    restores the seal set (unknown bits: EOPNOTSUPP) and allows more sealing only if
    ``F_SEAL_SEAL`` is absent."""

    def __init__(self, k: Kernel, compatible: str) -> None:
        super().__init__(k)
        self.compatible = compatible
        self.v2 = compatible == memfd_abi.MEMFD_V2

    def _ser(self, f: File, desc: KhoVmalloc, fmt: str | None = None) -> bytes:
        m, fmt = f.private, fmt or self.compatible
        v2 = fmt == memfd_abi.MEMFD_V2
        return memfd_abi.encode_ser(memfd_abi.MemfdSer(
            f.pos, m.size, len(m.index), desc, m.seals if v2 else 0, fmt))

    def preserve(self, f: File) -> int:
        m = f.private
        if self.v2 and m.seals & ~memfd.ALL_SEALS:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="memfd: unknown seals")
        self.pin(m)
        kout = self.k.require_kho()
        desc = KhoVmalloc(0, 0, 0, 0)
        try:
            if len(m.index):
                desc = kout.preserve_vmalloc(memfd_abi.encode_folio_array(self.folios(m)))
            return kout.store(self._ser(f, desc))
        except (LiveUpdateError, AbiError):
            if desc.first:
                kout.unpreserve_vmalloc(desc)
            self.unpin(m)
            raise

    def _decode(self, raw: bytes) -> memfd_abi.MemfdSer:
        try:
            return memfd_abi.decode_ser(raw, self.compatible)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=e.message) from e

    def unpreserve(self, f: File, data: int) -> None:
        ser = self._decode(self.k.read(data, memfd_abi.SER_V2_SIZE if self.v2
                                       else memfd_abi.SER_V1_SIZE))
        kout = self.k.require_kho()
        if ser.folios.first:
            kout.unpreserve_vmalloc(ser.folios)
        kout.unpreserve_free(data, PAGE_SIZE)
        self.unpin(f.private)

    def freeze(self, f: File, data: int) -> int:
        """Rewrite ``pos`` -- in the agreed format when negotiation picked an older one
        (a 7.1+ kernel writing ``memfd-v1`` for 6.19: the same page, 40 bytes, no seals;
        :mod:`liveupdate.kernel.negotiate` refused the load if the seals mattered)."""
        size = memfd_abi.SER_V2_SIZE if self.v2 else memfd_abi.SER_V1_SIZE
        ser = self._decode(self.k.read(data, size))
        self.k.write(data, self._ser(f, ser.folios, negotiate.out_format(self.k, "memfd")))
        return data

    def unfreeze(self, f: File, data: int) -> None:
        """Back to this kernel's own format (a newer pos is still a valid preservation)."""
        fmt = negotiate.out_format(self.k, "memfd") or self.compatible
        if fmt != self.compatible:
            raw = self.k.read(data, memfd_abi.SER_V2_SIZE if fmt == memfd_abi.MEMFD_V2
                              else memfd_abi.SER_V1_SIZE)
            ser = memfd_abi.decode_ser(raw, fmt)
            self.k.write(data, self._ser(f, ser.folios).ljust(len(raw), b"\0"))

    def _take(self, data: int) -> tuple[memfd_abi.MemfdSer, memfd_abi.Folios]:
        """The struct and the folio array, with their pages taken back and freed."""
        ser = self._decode(self.take_meta(data)[: memfd_abi.SER_V2_SIZE if self.v2
                                                else memfd_abi.SER_V1_SIZE])
        if ser.nr_folios == 0:
            return ser, memfd_abi.Folios.empty()
        kin = self.k.kho_in
        area = None if kin is None else kho.restore_vmalloc(kin, self.k.meta, self.k.mem,
                                                            ser.folios)
        if area is None:
            raise LiveUpdateError(err=errno.EIO, msg="memfd: the folio array was not "
                                  "preserved as a KHO vmalloc area")
        raw = area.read(self.k.mem)
        for p in np.concatenate([area.chunk_phys, area.block_phys]).tolist():
            self.k.free_pages(p, 0 if p in area.chunk_phys else ser.folios.order)
        try:
            return ser, memfd_abi.decode_folio_array(raw, ser.nr_folios, ser.size)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EIO, msg=e.message) from e

    def retrieve(self, data: int) -> File:
        ser, folios = self._take(data)
        m = self.restore_folios(folios, ser.size)
        m.seals = ser.seals if self.v2 else memfd.F_SEAL_SEAL
        return memfd.open_file(m, ser.pos)

    def finish(self, data: int, retrieved: File | None) -> None:
        if retrieved is not None:
            return
        try:
            ser, folios = self._take(data)
        except LiveUpdateError as e:
            self.k.printk(f"memfd: finish: {e.message}; preserved pages stay reserved")
            return
        self.free_unretrieved(folios, ser.size)
