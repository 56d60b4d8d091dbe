"""hugetlb memfd preservation after Pratyush Yadav's RFC (``mm/hugetlb_luo.c``,
``<20251206230222.853493-1-pratyush@kernel.org>``; docs/posted-series.md 4): the file handler
``huge-memfd-v1`` and the FLB ``hugetlb-v1``, registered for the ``7.3+posted`` generation
only (its row names the ``huge-memfd`` component). Plain 7.3 has no handler for a hugetlb file
(``memfd_luo_can_preserve`` wants shmem): PRESERVE_FD is ENOENT there, as 7.3.4 answers.

**Outgoing.** The FLB (created with the first preserved huge memfd) is one 37-byte
``hugetlb_ser`` with an entry per hstate of this kernel, ``nr_pages`` 0. ``preserve``
allocates every hole of the file from the pool, preserves each folio with KHO *at the hstate
order* (the RFC's 01/10 lifts KHO's MAX_PAGE_ORDER limit: a 1 GiB folio is order 18), counts
it in its hstate's entry (an order the FLB lacks: ENOENT), writes the folio array
(``{pfn, index in base pages}``) through KHO vmalloc and the 41-byte ``hugemfd_ser``, and
freezes the size; ``freeze`` refreshes ``pos``; ``unpreserve`` undoes it all.

**Incoming.** The previous kernel's counts were read at boot (:func:`incoming_counts`, the
RFC's early FLB access) so the pools were made smaller by the pages files hold.
``retrieve`` restores each folio at its order (``kho_restore_folio``), accounts it to the
hstate (it joins the pool's total, in use by the file) and builds a hugetlb memfd of the
preserved size and position over the same physical folios -- zero copy. An entry that is not
a preserved head page of the file's order is EINVAL (nothing kept). ``finish`` of a file never
retrieved gives its folios to the hstate's free pool. The FLB's retrieve frees its page.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import hugetlb as abi
from liveupdate.abi import luo_session
from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.formats import compatible_of
from liveupdate.abi.kho_memmap import MAX_MAP_ORDER
from liveupdate.abi.vmalloc import KhoVmalloc
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs import hugetlbfs, memfd
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.luo.handler import Args, register_file_handler
from liveupdate.kernel.luo.handover import reader_for

LUO_KHO_ENTRY_NAME = "LUO"  # kernel/luo/session.py's (the KHO subtree LUO publishes)

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel
    from liveupdate.kernel.mm.hugetlb import Hstate


class HugetlbFlb:
    """FLB ``hugetlb-v1``: the per-hstate counts of preserved huge pages."""

    name = abi.FLB_COMPATIBLE

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.phys = 0
        self.counts: dict[int, int] = {}  # order -> pages

    def _write(self) -> None:
        hs = tuple((o, n) for o, n in self.counts.items())
        self.k.write(self.phys, abi.encode_flb(abi.HugetlbSer(hs)))

    def preserve(self) -> int:
        hs = self.k.hugetlb
        self.counts = {h.order: 0 for h in (hs.hstates if hs else [])}
        self.phys = self.k.require_kho().store(bytes(abi.FLB_SIZE))
        self._write()
        return self.phys

    def unpreserve(self, data: int) -> None:
        self.k.require_kho().unpreserve_free(data, PAGE_SIZE)
        self.phys, self.counts = 0, {}

    def add(self, order: int, n: int) -> None:
        if order not in self.counts or not self.phys:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"hugetlb: no hstate of order "
                                  f"{order} in the FLB")
        self.counts[order] += n
        self._write()

    def retrieve(self, data: int) -> None:
        kin = self.k.kho_in
        if kin is None or not kin.restore_free(data):
            self.k.printk(f"hugetlb: FLB at {data:#x} was not preserved")

    def finish(self, data: int) -> None:
        """Nothing: retrieve freed the struct."""


def incoming_counts(k: Kernel) -> dict[int, int]:
    """``hstate_liveupdate_pages`` for every hstate: the previous kernel's ``hugetlb-v1``
    counts, read early from the incoming LUO handover (the RFC's 04/10), read-only. Anything
    unreadable -- no handover, no LUO, no such FLB, a bad struct -- counts 0."""
    kin = k.kho_in
    if kin is None or "huge-memfd" not in k.image.native():
        return {}
    node = LUO_KHO_ENTRY_NAME
    try:
        phys = kin.retrieve_subtree(node)
    except LiveUpdateError:
        return {}  # no LUO handover: nothing preserved
    try:
        head = k.mem.read(phys, 4, "LUO blob")
        inc = reader_for((k.gen.luo.luo,), head).read(k.mem, phys, kin.root.size(node), False)
        flbs = {f.name: f for f in (luo_session.decode_flbs(k.mem, inc.flbs)
                                    if inc.flbs else [])}
        flb = flbs.get(abi.FLB_COMPATIBLE)
        if flb is not None:
            ser = abi.decode_flb(k.mem.read(flb.data, abi.FLB_SIZE, "hugetlb FLB"))
            return dict(ser.hstates)
    except (AbiError, LiveUpdateError) as e:
        k.printk(f"hugetlb: cannot read the live update FLB ({e.message}); counting 0")
    return {}


def _hstate(k: Kernel, order: int) -> Hstate:
    h = None if k.hugetlb is None else k.hugetlb.size_to_hstate(PAGE_SIZE << order)
    if h is None:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"hugetlb: no hstate of order {order}")
    return h


class HugeMemfdHandler:
    """File handler ``huge-memfd-v1``."""

    component = "huge-memfd"

    def __init__(self, k: Kernel, fmt: str) -> None:
        self.k, self.format, self.compatible = k, fmt, compatible_of(fmt)
        self.flb = HugetlbFlb(k)

    def can_preserve(self, f: File) -> bool:
        return isinstance(f.private, hugetlbfs.HugeMemfd)  # a hugetlbfs file with no links

    def _ser(self, f: File, m: hugetlbfs.HugeMemfd, desc: KhoVmalloc) -> bytes:
        return abi.encode_ser(abi.HugeMemfdSer(m.size, f.pos, len(m.index), desc, m.horder))

    def preserve(self, a: Args) -> int:
        f = _file(a)
        m = f.private
        assert isinstance(m, hugetlbfs.HugeMemfd)
        m.populate(0, m.size >> PAGE_SHIFT)  # pin all folios: holes are allocated
        kout = self.k.require_kho()
        kout.preserve_blocks(m.phys, m.order, max_order=MAX_MAP_ORDER)
        desc = KhoVmalloc(0, 0, 0, 0)
        try:
            self.flb.add(m.horder, len(m.index))
            try:
                if len(m.index):
                    desc = kout.preserve_vmalloc(abi.encode_folios(abi.HugeFolios(
                        m.phys >> np.uint64(PAGE_SHIFT), m.index.astype(np.uint64))))
                data = kout.store(self._ser(f, m, desc))
            except (LiveUpdateError, AbiError):
                if desc.first:
                    kout.unpreserve_vmalloc(desc)
                self.flb.add(m.horder, -len(m.index))
                raise
        except (LiveUpdateError, AbiError):
            kout.unpreserve_blocks(m.phys, m.order)
            raise
        m.frozen = True
        m.get()
        return data

    def _read(self, data: int) -> abi.HugeMemfdSer:
        try:
            return abi.decode_ser(self.k.read(data, abi.SER_SIZE))
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=e.message) from e

    def unpreserve(self, a: Args) -> None:
        ser = self._read(a.data)
        m = _file(a).private
        kout = self.k.require_kho()
        if ser.folios.first:
            kout.unpreserve_vmalloc(ser.folios)
        kout.unpreserve_free(a.data, PAGE_SIZE)
        kout.unpreserve_blocks(m.phys, m.order)
        if self.flb.phys:
            self.flb.add(m.horder, -len(m.index))
        m.frozen = False
        m.put()

    def freeze(self, a: Args) -> int:
        ser = self._read(a.data)
        self.k.write(a.data, self._ser(_file(a), _file(a).private, ser.folios))
        return a.data

    def unfreeze(self, a: Args) -> None:
        """Nothing: a newer pos is still a valid preservation."""

    # -- incoming -------------------------------------------------------------------------
    def _take(self, data: int) -> tuple[abi.HugeMemfdSer, abi.HugeFolios]:
        """The struct and the folio array; their pages taken back and freed."""
        kin = self.k.kho_in
        if kin is None or kin.restore_folio(data) is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"huge memfd: {data:#x} was not "
                                  "preserved")
        raw = self.k.read(data, abi.SER_SIZE)
        self.k.free_pages(data, 0)
        try:
            ser = abi.decode_ser(raw)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=e.message) from e
        if ser.nr_folios == 0:
            return ser, abi.HugeFolios(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        area = kin.restore_vmalloc(ser.folios)
        if area is None:
            raise LiveUpdateError(err=errno.ENOMEM, msg="huge memfd: the folio array was "
                                  "not preserved as a KHO vmalloc area")
        raw = area.read(self.k.mem)
        for p in area.chunk_phys.tolist():
            self.k.free_pages(p, 0)
        for p in area.block_phys.tolist():
            self.k.free_pages(p, ser.folios.order)
        try:
            return ser, abi.decode_folios(raw, ser)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=e.message) from e

    def _restore(self, ser: abi.HugeMemfdSer, folios: abi.HugeFolios) -> hugetlbfs.HugeMemfd:
        """Each folio back at its order, accounted to the hstate; EINVAL keeps nothing."""
        kin = self.k.kho_in
        h = _hstate(self.k, ser.order)
        pfn = folios.pfn.astype(np.int64)
        if kin is None or np.any(kin.preserved_orders(pfn) != ser.order):
            raise LiveUpdateError(err=errno.EINVAL, msg="huge memfd: a folio is not a "
                                  f"preserved order-{ser.order} page")
        phys = folios.pfn << np.uint64(PAGE_SHIFT)
        kin.restore_folios(phys, ser.order)
        h.adopt(len(phys))
        m = hugetlbfs.HugeMemfd(hugetlbfs.PoolOps(self.k, h), "", self.k.next_ino, "always",
                                horder=ser.order)
        self.k.next_ino += 1
        m.size = ser.size
        m.adopt(folios.index.astype(np.int64), phys,
                np.full(len(phys), ser.order, np.uint8))
        return m

    def retrieve(self, a: Args) -> File:
        ser, folios = self._take(a.data)
        m = self._restore(ser, folios)
        m.seals = memfd.F_SEAL_SEAL  # no seals in the RFC's struct: hugetlb_file_setup's
        return memfd.open_file(m, ser.pos)

    def finish(self, a: Args) -> None:
        if a.file is not None:
            return
        try:
            m = self._restore(*self._take(a.data))
        except LiveUpdateError as e:
            self.k.printk(f"huge memfd: finish: {e.message}; preserved pages stay reserved")
            return
        m.get()
        m.put()  # the folios go to the hstate's free pool


def _file(a: Args) -> File:
    assert a.file is not None, "outgoing operations always carry the file"
    return a.file


def init() -> None:
    """``hugetlb_luo_init``: register beside hugetlbfs (a boot initcall)."""
    register_file_handler("huge-memfd", ("huge-memfd-v1",), HugeMemfdHandler)


def register_flb(k: Kernel) -> None:
    """Attach the FLB to this LUO's huge-memfd handler (``liveupdate_register_flb``)."""
    luo = k.luo
    flbs = getattr(luo, "flbs", None)
    for h in getattr(luo, "handlers", []):
        if isinstance(h, HugeMemfdHandler) and flbs is not None:
            flbs.register(h.compatible, h.flb)
