"""The IOMMU FLB ``"iommu-liveupdate"`` (version 1) as the IOMMU live update series v5 builds
it (``<20260921004834.2601285-1-skhawaja@google.com>``; docs/posted-series.md 3.1-3.6), over
the Intel driver's tables: the outgoing side (:class:`IommuFlb`, registered on the iommufd
handler) and the next kernel's take-over of the live tables (:func:`take_over`).

Outgoing: FLB preserve allocates the 32-byte header and the three first array pages (units,
domains, devices), each ``kho_alloc_preserve``; ``iommu_domain_preserve`` (:meth:`add_domain`)
KHO-preserves every table page of the domain and appends its object; ``iommu_preserve_device``
(:meth:`add_device`) appends the device and, once per unit, the unit object with the root
table and every context table allocated (bitmap bit ``bus * 2``; legacy mode has the lower
table only), all KHO-preserved. Removal sets ``IOMMU_SER_FLAG_DELETED``; slots are never
reused. At the kexec (:func:`liveupdate.kernel.drivers.iommu.kernel_shutdown`) the context
entries of devices not preserved are cleared and translation **stays on**.

Decisions (docs/posted-series.md open questions): ``top_level`` counts leaves as level 0, so
a 4-level VT-d second-level table is ``top_level`` 3, ``vasz`` 48 (question 3); the unit's
``token`` is the register base, which the machine's single unit has at
:data:`DMAR_BASE` (0xfed90000, the usual first DMAR unit on x86); one array page per list
(102 domains, 56 devices): more is ENOSPC here, where the series chains pages.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import iommu_flb as ser
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.drivers import iommu
from liveupdate.kernel.drivers.iommu import ADDR_MASK, LARGE, LEVELS, Domain, Tables

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

NAME = ser.COMPATIBLE
DMAR_BASE = 0xFED90000
TOP_LEVEL = LEVELS - 1  # leaves are level 0 (open question 3)
VASZ = 48


class IommuFlb:
    """The outgoing FLB's state (``struct iommu_flb_ser`` and its arrays, in RAM)."""

    name = NAME

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self._reset()

    def _reset(self) -> None:
        self.head = 0
        self.lists: dict[str, int] = {}
        self.domains: dict[int, int] = {}  # did -> its object's phys
        self.devices: dict[int, int] = {}  # requester id -> its object's phys
        self.unit = 0
        self.kept: list[int] = []  # table pages KHO-preserved (root, context, domains)

    @property
    def tables(self) -> Tables:
        if self.k.iommu is None:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="IOMMU FLB: no IOMMU driver")
        return self.k.iommu

    def preserve(self) -> int:
        kout = self.k.require_kho()
        pages = [kout.alloc_preserve(PAGE_SIZE) for _ in range(4)]
        self.head, *arrays = pages
        self.lists = dict(zip(("units", "domains", "devices"), arrays, strict=True))
        for page in arrays:
            self.k.write(page, ser.encode_array([]))
        self.k.write(self.head, ser.encode_flb(*arrays))
        return self.head

    def unpreserve(self, data: int) -> None:
        kout = self.k.require_kho()
        for page in self.kept:
            kout.unpreserve_folio(page, 0)
        for page in (self.head, *self.lists.values()):
            kout.unpreserve_free(page, PAGE_SIZE)
        self._reset()

    def retrieve(self, data: int) -> None:
        """Nothing left to do: the driver took the tables over at boot (:func:`take_over`)."""

    def finish(self, data: int) -> None:
        """FLB finish: the header and array pages given back (the tables stay in use)."""
        kin = self.k.kho_in
        try:
            flb = ser.FLB.unpack(self.k.mem.read(data, ser.FLB.size, "IOMMU FLB"))
        except AbiError:
            return
        for page in (data, *flb[1:]):
            if kin is not None and kin.restore_folio(page) == 0:
                self.k.free_pages(page, 0)

    # -- objects ---------------------------------------------------------------------------
    def _append(self, which: str, obj: bytes) -> int:
        page = self.lists[which]
        _, n = ser.ARRAY.unpack(self.k.mem.read(page, ser.ARRAY.size, "IOMMU FLB array"))
        if ser.ARRAY.size + (n + 1) * len(obj) > PAGE_SIZE:
            raise LiveUpdateError(err=errno.ENOSPC, msg=f"IOMMU FLB: the {which} page is full")
        at: int = page + ser.ARRAY.size + int(n) * len(obj)
        self.k.write(at, obj)
        self.k.write(page, ser.ARRAY.pack(0, n + 1))
        return at

    def _delete(self, phys: int) -> None:
        refs, flags = ser.HDR.unpack(self.k.mem.read(phys, ser.HDR.size, "IOMMU FLB object"))
        self.k.write(phys, ser.HDR.pack(refs, flags | ser.FLAG_DELETED))

    def _keep(self, pages: list[int]) -> None:
        kout = self.k.require_kho()
        done: list[int] = []
        try:
            for p in pages:
                kout.preserve_folio(p, 0)
                done.append(p)
        except LiveUpdateError:
            for p in done:
                kout.unpreserve_folio(p, 0)
            raise
        self.kept += pages

    def _unkeep(self, pages: list[int]) -> None:
        kout = self.k.require_kho()
        for p in pages:
            kout.unpreserve_folio(p, 0)
            self.kept.remove(p)

    def add_domain(self, d: Domain) -> int:
        """``iommu_domain_preserve``: EBUSY if preserved already."""
        if d.did in self.domains:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"domain {d.did} is preserved already")
        pages = self.tables._walk_pages(d.top, LEVELS)
        if self.k.cmdline.flag("iommu_lu_drop_table") and len(pages) > 1:
            # fault injection (docs/devices.md, faults): the deepest table page is left
            # out of the handover, so the sanitizer punches it at the kexec
            self.k.printk(f"DMAR: fault injected: table page {pages[-1]:#x} not preserved")
            pages = pages[:-1]
        self._keep(pages)
        try:
            phys = self._append("domains", ser.encode_domain(d.top, TOP_LEVEL, VASZ))
        except LiveUpdateError:
            self._unkeep(pages)
            raise
        self.domains[d.did] = phys
        return phys

    def remove_domain(self, d: Domain) -> None:
        phys = self.domains.pop(d.did, 0)
        if phys:
            self._delete(phys)
            self._unkeep([p for p in self.tables._walk_pages(d.top, LEVELS)
                          if p in self.kept])

    def add_device(self, d: Domain, source: int, token: int) -> None:
        """``iommu_preserve_device``: EINVAL unless its domain is preserved, EBUSY twice."""
        if d.did not in self.domains:
            raise LiveUpdateError(err=errno.EINVAL, msg="the device's domain is not preserved")
        if source in self.devices:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"device {source:#06x} is preserved")
        if not self.unit:
            t = self.tables
            ctx = [t._get(t.root + 16 * bus) & ADDR_MASK for bus in range(256)]
            bits = {2 * bus for bus, c in enumerate(ctx) if c}
            self._keep([t.root, *(c for c in ctx if c)])
            self.unit = self._append("units", ser.encode_unit(DMAR_BASE, t.root, bits))
        self.devices[source] = self._append("devices", ser.encode_device(
            source, d.did, self.domains[d.did], self.unit, token))

    def remove_device(self, source: int) -> None:
        phys = self.devices.pop(source, 0)
        if phys:
            self._delete(phys)


def outgoing(k: Kernel) -> IommuFlb | None:
    """This kernel's IOMMU FLB, when LUO has it registered."""
    luo = getattr(k.luo, "flbs", None)
    flb = next((f.ops for f in luo.flbs if f.ops.name == NAME), None) if luo else None
    return flb if isinstance(flb, IommuFlb) else None


def take_over(k: Kernel, data: int) -> Tables:
    """VT-d init with an incoming IOMMU FLB: the root table the unit still translates with
    becomes the driver's, every preserved device's domain is rebuilt around its top table
    with its domain id (so no new domain takes it); the unit is not reprogrammed. A FLB
    that cannot be read is a panic, as the series' BUG: memory mapped into preserved domains
    may already be corrupted."""
    try:
        flb = ser.decode(k.mem, data)
        if len(flb.units) != 1 or flb.units[0].token != DMAR_BASE:
            raise AbiError(msg=f"IOMMU FLB: {len(flb.units)} units, this machine has one at "
                           f"{DMAR_BASE:#x}")
    except AbiError as e:
        k.panic(f"DMAR: cannot take the preserved IOMMU state over: {e.message}")
    tops = {d.phys: d.top_table for d in flb.domains}
    t = Tables.adopt(k.ram, lambda: k.alloc_pages(0), lambda p: k.free_pages(p, 0),
                     flb.units[0].root_table)
    for dev in flb.devices:
        dom = t.domains.setdefault(dev.did, Domain(dev.did, tops[dev.domain]))
        dom.devices.add(dev.devid)
    kin = k.kho_in
    if kin is not None:  # the table pages become this kernel's again (kho_restore_folio)
        for page in [t.root, *(t._get(t.root + 16 * b) & ADDR_MASK for b in range(256))]:
            if page:
                kin.restore_folio(page)
        for dom in list(t.domains.values()):
            _restore_domain(k, t, dom)
    k.printk(f"DMAR: took over the preserved root table at {t.root:#x} "
             f"({len(t.domains)} domains, {len(flb.devices)} devices; translation kept)")
    return t


def _restore_domain(k: Kernel, t: Tables, dom: Domain) -> None:
    """Every table page of a preserved domain restored (``kho_restore_folio``), top down: a
    page is read only once it is known to be preserved. One the handover did not preserve --
    punched by the sanitizer, free for this kernel to reuse -- could make the walk read
    garbage as entries, so the domain's devices are blocked instead: their context entries
    cleared, their DMA faults (context not present) and is logged."""
    lost = _restore_tables(k, t, dom.top, LEVELS)
    if lost is not None:
        for source in list(dom.devices):
            t.detach(dom, source)
        del t.domains[dom.did]
        k.printk(f"DMAR: domain {dom.did}: table page {lost:#x} was not preserved; "
                 "its devices are blocked")


def _restore_tables(k: Kernel, t: Tables, table: int, level: int) -> int | None:
    """The first table page below ``table`` (itself included) that was not preserved."""
    assert k.kho_in is not None
    if k.kho_in.restore_folio(table) is None:
        return table
    if level > 1:
        for i in range(512):
            pte = t._get(table + 8 * i)
            if pte and not pte & LARGE:
                lost = _restore_tables(k, t, pte & ADDR_MASK, level - 1)
                if lost is not None:
                    return lost
    return None


def blocked(k: Kernel) -> set[int]:
    """At the kexec, before translation is left on (our check, not the series'): the
    preserved devices whose domain has a table page the handover does not hold. Their
    context entries are cleared with the others' (``kernel_shutdown``), so from the jump on
    their DMA faults, logged, instead of walking a page the next kernel may reuse."""
    flb = outgoing(k)
    if flb is None or k.iommu is None:
        return set()
    kept, out = set(flb.kept), set()
    for d in k.iommu.domains.values():
        lost = [p for p in k.iommu._walk_pages(d.top, LEVELS) if p not in kept]
        if d.did in flb.domains and lost:
            out |= d.devices
            k.printk(f"DMAR: domain {d.did}: table page {lost[0]:#x} is not preserved; "
                     "its devices are blocked (kexec)")
    return out


def init(k: Kernel) -> None:
    """``intel_iommu_init``: with ``intel_iommu=on`` and an incoming IOMMU FLB, the live
    tables taken over (:func:`take_over`); otherwise the driver's own init (a new root
    table programmed into the unit)."""
    incoming = getattr(k.luo, "incoming_flb", lambda name: 0)(NAME)
    if incoming and k.link is not None and k.cmdline.get("intel_iommu", "off") == "on":
        k.iommu = take_over(k, incoming)
    else:
        iommu.init(k)
