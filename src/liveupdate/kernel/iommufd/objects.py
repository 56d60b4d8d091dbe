"""iommufd's objects (``drivers/iommu/iommufd/``): a context per open ``/dev/iommu`` holding
IO address spaces (IOAS), hardware page tables (HWPT) and bound devices, by ID.

* An :class:`Ioas` is a set of non-overlapping :class:`Area` s, each a range of a memfd
  (``IOMMU_IOAS_MAP_FILE``: ``iopt_map_file_pages``). Mapping an area takes a reference on
  the memfd's inode and allocates its holes (as ``memfd_pin_folios`` does), then maps its
  physical extents into every page table of the IOAS: the device address is the IOVA, the
  memfd's own pages are what the device reaches (zero copy).
* A :class:`Hwpt` is a paging domain of the IOMMU driver (:class:`~liveupdate.kernel.drivers.
  iommu.Domain`) filled from its IOAS; devices attach to it (their context entries point at
  it). ``auto`` marks one made by attaching a device to the IOAS itself
  (``iommufd_device_auto_get_domain``), reused by the next device attached that way.
* An :class:`Idev` is a device bound by VFIO (``iommufd_device_bind``).

IDs come from one counter per context starting at 1 (``xa_alloc`` with ``XA_FLAGS_ALLOC1``;
IDs are not reused here, where Linux's xarray may reuse a freed one).

Limitations (documented, not hidden): no page pinning -- the area holds the inode, and a
shrinking ``ftruncate`` of a mapped memfd frees folios the IOMMU still maps (a sealed memfd,
as preservation requires, cannot shrink); no reserved IOVA regions (x86's MSI window is not
carved out of an IOAS with devices); no IOTLB to invalidate (the machine's unit caches none).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.devices_uapi import MAP_READABLE, MAP_WRITEABLE
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.drivers import iommu as intel

if TYPE_CHECKING:
    from liveupdate.kernel.fs.memfd import Memfd

IOVA_LIMIT = 1 << 48  # the 4-level second-level tables' address width (agaw 2)
MAX_LENGTH = (1 << 64) - 1


@dataclass(eq=False)
class Area:
    iova: int
    length: int
    memfd: Memfd
    start: int  # byte offset in the file
    prot: int  # MAP_READABLE | MAP_WRITEABLE
    seals: int  # the file's seals at map time (what the posted preserve checks)

    @property
    def last(self) -> int:
        return self.iova + self.length - 1

    def extents(self) -> list[tuple[int, int]]:
        first = self.start >> PAGE_SHIFT
        return self.memfd.extents(first, first + (self.length >> PAGE_SHIFT))


@dataclass(eq=False)
class Ioas:
    id: int
    areas: list[Area] = field(default_factory=list)
    hwpts: list[Hwpt] = field(default_factory=list)
    immutable: bool = False  # preserved (the posted iommufd-v1): no map or unmap

    def free_iova(self, length: int) -> int:
        """``iopt_alloc_iova``: the lowest free range, aligned to 2 MiB when it is that
        long (so superpage leaves can be used), else to a page."""
        align = 1 << 21 if length >= 1 << 21 else PAGE_SIZE
        iova = 0
        for a in sorted(self.areas, key=lambda a: a.iova):
            if iova + length <= a.iova:
                break
            iova = max(iova, -(-(a.last + 1) // align) * align)
        if iova + length > IOVA_LIMIT:
            raise LiveUpdateError(err=errno.ENOSPC, msg="IOAS: no free IOVA range")
        return iova

    def overlaps(self, iova: int, length: int) -> bool:
        return any(a.iova <= iova + length - 1 and iova <= a.last for a in self.areas)


@dataclass(eq=False)
class Hwpt:
    id: int
    ioas: Ioas
    domain: intel.Domain
    auto: bool = False
    devices: set[Idev] = field(default_factory=set)
    token: int | None = None  # IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE (posted)


@dataclass(eq=False)
class Idev:
    id: int
    bdf: int
    hwpt: Hwpt | None = None


Object = Ioas | Hwpt | Idev


def prot_bits(flags: int) -> int:
    """The map flags as PTE bits."""
    return (intel.READ if flags & MAP_READABLE else 0) | \
        (intel.WRITE if flags & MAP_WRITEABLE else 0)


class Ictx:
    """``struct iommufd_ctx``: one per open ``/dev/iommu``."""

    def __init__(self, tables: intel.Tables | None) -> None:
        self.tables = tables
        self.objects: dict[int, Object] = {}
        self._next = 1

    def _id(self) -> int:
        self._next += 1
        return self._next - 1

    def skip_ids(self, first_free: int) -> None:
        """IDs below ``first_free`` are taken (objects a retrieve made)."""
        self._next = max(self._next, first_free)

    def new_ioas(self) -> Ioas:
        ioas = Ioas(self._id())
        self.objects[ioas.id] = ioas
        return ioas

    def new_idev(self, bdf: int) -> Idev:
        idev = Idev(self._id(), bdf)
        self.objects[idev.id] = idev
        return idev

    def get(self, id_: int, kind: type[Ioas] | type[Hwpt] | type[Idev],
            what: str) -> Object:
        obj = self.objects.get(id_)
        if not isinstance(obj, kind):
            raise LiveUpdateError(err=errno.ENOENT, msg=f"{what}: no {kind.__name__} {id_}")
        return obj

    # -- IOAS ----------------------------------------------------------------------------
    def map_area(self, ioas: Ioas, area: Area) -> None:
        """The area's pages allocated, then mapped into every page table of the IOAS; a
        table that cannot take it undoes what was mapped (nothing half done)."""
        first = area.start >> PAGE_SHIFT
        area.memfd.populate(first, first + (area.length >> PAGE_SHIFT))
        done: list[Hwpt] = []
        try:
            for h in ioas.hwpts:
                self._fill(h, area)
                done.append(h)
        except ValueError as e:
            for h in done:
                self._clear(h, area)
            raise LiveUpdateError(err=errno.EINVAL, msg=f"IOAS map: {e}") from e
        ioas.areas.append(area)
        area.memfd.get()

    def unmap(self, ioas: Ioas, iova: int, length: int) -> int:
        """``iopt_unmap_iova_range``: every area inside the range; one that crosses its
        edge is ENOENT (nothing unmapped), as is a range with no area."""
        last = iova + length - 1
        hit = [a for a in ioas.areas if a.iova <= last and iova <= a.last]
        if not hit or any(a.iova < iova or a.last > last for a in hit):
            raise LiveUpdateError(err=errno.ENOENT, msg=f"IOAS unmap {iova:#x}+{length:#x}: "
                                  "no area, or an area crossing the range's edge")
        for a in hit:
            self.remove_area(ioas, a)
        return sum(a.length for a in hit)

    def remove_area(self, ioas: Ioas, a: Area) -> None:
        for h in ioas.hwpts:
            self._clear(h, a)
        ioas.areas.remove(a)
        a.memfd.put()

    def _fill(self, h: Hwpt, a: Area) -> None:
        assert self.tables is not None
        iova = a.iova
        for phys, n in a.extents():
            self.tables.map(h.domain, iova, phys, n, prot_bits(a.prot))
            iova += n

    def _clear(self, h: Hwpt, a: Area) -> None:
        assert self.tables is not None
        iova = a.iova
        for _, n in a.extents():
            self.tables.unmap(h.domain, iova, n)
            iova += n

    # -- HWPT ----------------------------------------------------------------------------
    def hwpt_alloc(self, ioas: Ioas, auto: bool) -> Hwpt:
        """A paging domain holding every mapping of ``ioas``."""
        if self.tables is None:
            raise LiveUpdateError(err=errno.ENODEV, msg="HWPT: no IOMMU (intel_iommu=on)")
        h = Hwpt(self._next, ioas, self.tables.domain(), auto)  # its ID once it exists
        try:
            for a in ioas.areas:
                self._fill(h, a)
        except ValueError as e:
            self.tables.free_domain(h.domain)
            raise LiveUpdateError(err=errno.EINVAL, msg=f"HWPT: {e}") from e
        self.objects[self._id()] = h
        ioas.hwpts.append(h)
        return h

    def hwpt_free(self, h: Hwpt) -> None:
        assert self.tables is not None
        self.tables.free_domain(h.domain)
        h.ioas.hwpts.remove(h)
        del self.objects[h.id]

    def attach(self, idev: Idev, h: Hwpt) -> None:
        """``iommufd_device_attach``: the device's context entry points at ``h``'s table;
        attached elsewhere already is EINVAL (replace is not emulated)."""
        if idev.hwpt is h:
            return
        if idev.hwpt is not None:
            raise LiveUpdateError(err=errno.EINVAL, msg="attach: the device is attached "
                                  f"to HWPT {idev.hwpt.id}")
        assert self.tables is not None
        self.tables.attach(h.domain, idev.bdf)
        h.devices.add(idev)
        idev.hwpt = h

    def detach(self, idev: Idev) -> None:
        h = idev.hwpt
        if h is None:
            return
        assert self.tables is not None
        self.tables.detach(h.domain, idev.bdf)
        h.devices.discard(idev)
        idev.hwpt = None
        if h.auto and not h.devices:  # the auto domain goes with its last device
            self.hwpt_free(h)

    def destroy(self, id_: int) -> None:
        """``IOMMU_DESTROY``: ENOENT for no such object, EBUSY while something uses it
        (an IOAS with page tables, a HWPT with devices, a device VFIO holds)."""
        obj = self.objects.get(id_)
        if obj is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"destroy: no object {id_}")
        busy = (isinstance(obj, Ioas) and bool(obj.hwpts)) or isinstance(obj, Idev) or \
            (isinstance(obj, Hwpt) and bool(obj.devices))
        if busy:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"destroy: object {id_} is in use")
        if isinstance(obj, Hwpt):
            self.hwpt_free(obj)
            return
        assert isinstance(obj, Ioas)
        for a in list(obj.areas):
            self.remove_area(obj, a)
        del self.objects[id_]

    def release(self) -> None:
        """The last close of ``/dev/iommu``: every object, devices first (VFIO unbinds its
        own on its close; a context cannot outlive them, it is referenced by them)."""
        for obj in list(self.objects.values()):
            if isinstance(obj, Hwpt) and obj.id in self.objects:
                for idev in list(obj.devices):
                    self.detach(idev)
                if obj.id in self.objects:
                    self.hwpt_free(obj)
        for obj in list(self.objects.values()):
            if isinstance(obj, Ioas):
                self.destroy(obj.id)
