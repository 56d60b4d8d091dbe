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
from liveupdate.abi.formats import compatible_of
from liveupdate.abi.vmalloc import KhoVmalloc
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs import memfd
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.luo.handler import Args, register_file_handler
from liveupdate.kernel.luo.rules import rules_of

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

UINT_MAX = (1 << 32) - 1
FOLIO_FLAGS = memfd_abi.FOLIO_DIRTY | memfd_abi.FOLIO_UPTODATE


class MemfdLuo:
    """What every memfd handler does; subclasses add their serialized format."""

    component = "memfd"

    def __init__(self, k: Kernel, fmt: str) -> None:
        self.k = k
        self.format = fmt
        self.compatible = compatible_of(fmt)
        self.rules = rules_of(k.gen.luo)  # the running kernel's: EFBIG, restored seals

    def can_preserve(self, f: File) -> bool:
        return isinstance(f.private, memfd.Memfd)  # unlinked shmem: every memfd

    # -- outgoing -------------------------------------------------------------------------
    def pin(self, m: memfd.Memfd) -> None:
        if -(-m.size // PAGE_SIZE) > UINT_MAX:
            raise LiveUpdateError(err=self.rules.too_many_pages,
                                  msg="memfd: more than UINT_MAX pages")
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
        order = kin.preserved_orders(pfn)
        if np.any(order < 0):
            raise LiveUpdateError(err=errno.EIO, msg="memfd: a folio was not preserved")
        order = order.astype(np.uint8)
        ends = index + (np.int64(1) << order.astype(np.int64))
        srt = np.argsort(index)
        if (np.any(order > MAX_PAGE_ORDER) or np.any(ends > -(-size // PAGE_SIZE))
                or np.any(index[srt][1:] < ends[srt][:-1])):
            raise LiveUpdateError(err=errno.EIO, msg="memfd: folios overlap or pass the end")
        phys = pfn.astype(np.uint64) << np.uint64(PAGE_SHIFT)
        done = np.zeros(len(pfn), bool)
        for o in np.unique(order).tolist():
            sel = order == o
            done[sel] = kin.restore_folios(phys[sel], o)
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
        order = None if kin is None else kin.restore_folio(phys)
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

    def _encode(self, f: File) -> tuple[bytes, int]:
        m = f.private
        folios = self.folios(m)
        return (memfd_abi.encode_fdt(memfd_abi.MemfdState(f.pos, m.size, folios)),
                memfd_abi.fdt_alloc_size(len(folios)))

    def preserve(self, a: Args) -> int:
        f = _file(a)
        self.pin(f.private)
        try:
            blob, size = self._encode(f)
            return self.store(blob, size)
        except (LiveUpdateError, AbiError):
            self.unpin(f.private)
            raise

    def unpreserve(self, a: Args) -> None:
        f = _file(a)
        self.drop(a.data, memfd_abi.fdt_alloc_size(len(f.private.index)))
        self.unpin(f.private)

    def freeze(self, a: Args) -> int:
        blob, _ = self._encode(_file(a))  # the same folios: the same size; only pos changes
        self.k.write(a.data, blob)
        return a.data

    def unfreeze(self, a: Args) -> None:
        """Nothing to undo: the FDT with a newer pos is still a valid preservation."""

    def _take_state(self, data: int) -> memfd_abi.MemfdState:
        blob = self.take_meta(data)
        try:
            return memfd_abi.decode_fdt(blob)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=e.message) from e

    def retrieve(self, a: Args) -> File:
        st = self._take_state(a.data)
        return memfd.open_file(self.restore_folios(st.folios, st.size), st.pos)

    def finish(self, a: Args) -> None:
        if a.file is not None:
            return  # retrieve took the folios and freed the FDT
        try:
            st = self._take_state(a.data)
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

    def _ser(self, f: File, desc: KhoVmalloc, compatible: str = "",
             seals: int | None = None) -> bytes:
        m, compatible = f.private, compatible or self.compatible
        seals = m.seals if seals is None else seals
        seals = seals if memfd_abi.HAS_SEALS[compatible] else 0
        return memfd_abi.encode_ser(memfd_abi.MemfdSer(
            f.pos, m.size, len(m.index), desc, seals, compatible))

    def _read(self, data: int, compatible: str = "") -> memfd_abi.MemfdSer:
        compatible = compatible or self.compatible
        raw = self.k.read(data, memfd_abi.SER_SIZE[compatible])
        try:
            return memfd_abi.decode_ser(raw, compatible)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=e.message) from e

    def preserve(self, a: Args) -> int:
        f = _file(a)
        m = f.private
        if memfd_abi.HAS_SEALS[self.compatible] and m.seals & ~memfd.ALL_SEALS:
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

    def unpreserve(self, a: Args) -> None:
        ser = self._read(a.data)
        kout = self.k.require_kho()
        if ser.folios.first:
            kout.unpreserve_vmalloc(ser.folios)
        kout.unpreserve_free(a.data, PAGE_SIZE)
        self.unpin(_file(a).private)

    def freeze(self, a: Args) -> int:
        """``memfd_luo_freeze``: rewrite ``pos`` only -- the seals stay those of PRESERVE_FD
        (a seal added later is not handed over; seen on Linux 7.3.4 by the differential
        suite). In the plan's format: a 7.1+ kernel writing ``memfd-v1`` for 6.19
        (negotiated) writes the same page, 40 bytes, no seals --
        :mod:`liveupdate.kernel.negotiate` refused the load if the seals mattered."""
        ser = self._read(a.data)
        self.k.write(a.data, self._ser(_file(a), ser.folios, compatible_of(a.out_format),
                                       ser.seals))
        return a.data

    def unfreeze(self, a: Args) -> None:
        """Back to this kernel's own format (a newer pos is still a valid preservation)."""
        written = compatible_of(a.out_format)
        if written != self.compatible:
            ser = self._read(a.data, written)
            raw = self._ser(_file(a), ser.folios)
            self.k.write(a.data, raw.ljust(memfd_abi.SER_SIZE[written], b"\0"))

    def _take(self, data: int) -> tuple[memfd_abi.MemfdSer, memfd_abi.Folios]:
        """The struct and the folio array, with their pages taken back and freed."""
        raw = self.take_meta(data)[: memfd_abi.SER_SIZE[self.compatible]]
        try:
            ser = memfd_abi.decode_ser(raw, self.compatible)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=e.message) from e
        if ser.nr_folios == 0:
            return ser, memfd_abi.Folios.empty()
        kin = self.k.kho_in
        area = None if kin is None else kin.restore_vmalloc(ser.folios)
        if area is None:
            raise LiveUpdateError(err=self.rules.folio_array_lost, msg="memfd: the folio "
                                  "array was not preserved as a KHO vmalloc area")
        raw = area.read(self.k.mem)
        for p in np.concatenate([area.chunk_phys, area.block_phys]).tolist():
            self.k.free_pages(p, 0 if p in area.chunk_phys else ser.folios.order)
        try:
            return ser, memfd_abi.decode_folio_array(raw, ser.nr_folios, ser.size)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EIO, msg=e.message) from e

    def retrieve(self, a: Args) -> File:
        ser, folios = self._take(a.data)
        m = self.restore_folios(folios, ser.size)
        m.seals = (self.rules.restore_seals(ser.seals) if memfd_abi.HAS_SEALS[self.compatible]
                   else memfd.F_SEAL_SEAL)
        return memfd.open_file(m, ser.pos)

    def finish(self, a: Args) -> None:
        if a.file is not None:
            return
        try:
            ser, folios = self._take(a.data)
        except LiveUpdateError as e:
            self.k.printk(f"memfd: finish: {e.message}; preserved pages stay reserved")
            return
        self.free_unretrieved(folios, ser.size)


def _file(a: Args) -> File:
    assert a.file is not None, "outgoing operations always carry the file"
    return a.file


def init() -> None:
    """``memfd_luo_init``: register beside memfd (a boot initcall, kernel/initcalls.py)."""
    register_file_handler("memfd", ("memfd-fdt",), MemfdFdtHandler)
    register_file_handler("memfd", ("memfd-v1", "memfd-v2"), MemfdSerHandler)
