"""The kernel's IOMMU tables walked by the machine's IOMMU: every mapping the driver makes
(4 KiB, 2 MiB and 1 GiB leaves, split at alignment) translates to its physical address
through the hardware's walk, unmapped addresses fault, and the table pages the driver reports
are exactly the pages it took."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from liveupdate.kernel.drivers import iommu as drv
from liveupdate.machine.iommu import Iommu, Translated
from liveupdate.machine.ram import Ram

SRC = 0x0318


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram(128 << 20)
    yield r
    r.close()


class Pages:
    def __init__(self) -> None:
        self.next, self.taken = 0x100000, []

    def __call__(self) -> int:
        self.taken.append(self.next)
        self.next += 0x1000
        return self.taken[-1]


def test_what_the_driver_maps_the_hardware_translates(ram: Ram) -> None:
    pages = Pages()
    t = drv.Tables(ram.map, pages)
    d = t.domain()
    t.attach(d, SRC)
    t.map(d, 0x10000, 0x2000000, 0x3000)  # three 4 KiB leaves
    t.map(d, 0x40000000 - 0x1000, 0x3FFF000, 0x201000)  # a 4 KiB leaf, then a 2 MiB one
    t.map(d, 1 << 30 << 1, 0, 1 << 30, drv.READ)  # one read-only 1 GiB leaf
    hw = Iommu(ram)
    drv.program(hw.write_reg, t.root)
    assert hw.enabled
    for iova, phys in ((0x10000, 0x2000000), (0x12FF8, 0x2002FF8),
                       (0x3FFFF000, 0x3FFF000), (0x40000000, 0x4000000),
                       (0x401FFFF8, 0x41FFFF8), ((2 << 30) + 0x5000000, 0x5000000)):
        assert hw.translate(SRC, iova, 8, write=False) == phys, hex(iova)
    for iova, write in ((0x13000, False), (0x40200000, False), ((2 << 30) + 8, True)):
        with pytest.raises(Translated):
            hw.translate(SRC, iova, 8, write=write)
    with pytest.raises(Translated):  # another device: no context entry
        hw.translate(SRC + 1, 0x10000, 8, write=False)
    assert sorted(t.table_pages()) == sorted(pages.taken)
    drv.shutdown(hw.write_reg)
    assert not hw.enabled


def test_overlaps_and_misalignment_are_refused(ram: Ram) -> None:
    t = drv.Tables(ram.map, Pages())
    d = t.domain()
    t.map(d, 0x200000, 0x200000, 0x200000)  # a 2 MiB leaf
    for iova, phys, size in ((0x200000, 0x400000, 0x1000), (0x201000, 0x1000, 0x1000),
                             (0x1001, 0x1000, 0x1000), (1 << 48, 0, 0x1000)):
        with pytest.raises(ValueError):
            t.map(d, iova, phys, size)


def test_unmap_detach_and_free_leave_nothing_translating(ram: Ram) -> None:
    pages = Pages()
    freed: list[int] = []
    t = drv.Tables(ram.map, pages, freed.append)
    d = t.domain()
    t.attach(d, SRC)
    t.map(d, 0, 0x2000000, 0x201000)  # a 2 MiB leaf and a 4 KiB one
    hw = Iommu(ram)
    drv.program(hw.write_reg, t.root)
    with pytest.raises(ValueError):  # half a superpage
        t.unmap(d, 0, 0x1000)
    t.unmap(d, 0x200000, 0x1000)
    assert hw.translate(SRC, 0x1000, 8, write=True) == 0x2001000
    with pytest.raises(Translated):
        hw.translate(SRC, 0x200000, 8, write=True)
    t.detach(d, SRC)
    with pytest.raises(Translated) as e:
        hw.translate(SRC, 0x1000, 8, write=True)
    assert e.value.fault.reason == 2  # context not present
    t.attach(d, SRC)
    t.free_domain(d)
    assert not d.devices and d.did not in t.domains
    assert sorted(freed) == sorted(set(pages.taken) - set(t.table_pages()))
    assert t.domain().did == 1  # the id is free again
