"""The IOMMU's walk over tables laid out in RAM as Linux's Intel driver writes them: leaves
of 4 KiB, 2 MiB and 1 GiB, pass-through, every fault reason it models, nothing written by a
refused DMA, and the latch of the root table pointer."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator

import pytest

from liveupdate.machine import iommu as vtd
from liveupdate.machine.iommu import Iommu, Translated
from liveupdate.machine.ram import Ram

SRC = 0x0318  # 03:03.0
RW = vtd.PTE_READ | vtd.PTE_WRITE


class Tables:
    """A root table at 1 MiB and page-table pages allocated upward from it."""

    def __init__(self, ram: Ram, levels: int = 4) -> None:
        self.ram, self.levels, self.next = ram, levels, 0x100000
        self.root = self.page()
        ctx = self.page()
        self.top = self.page()
        self.u64(self.root + 16 * (SRC >> 8), ctx | 1)
        self.ctx = ctx + 16 * (SRC & 0xFF)
        self.u64(self.ctx, self.top | vtd.TT_MULTI_LEVEL << 2 | 1)
        self.u64(self.ctx + 8, {3: 1, 4: 2}[levels] | 5 << 8)  # address width, domain 5

    def page(self) -> int:
        self.next += 0x1000
        return self.next - 0x1000

    def u64(self, phys: int, value: int) -> None:
        self.ram.write(phys, struct.pack("<Q", value))

    def map(self, iova: int, phys: int, bits: int = RW, level: int = 1) -> None:
        """A leaf at ``level`` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB)."""
        table = self.top
        for lvl in range(self.levels, level, -1):
            at = table + 8 * ((iova >> (12 + 9 * (lvl - 1))) & 0x1FF)
            pte = struct.unpack("<Q", self.ram.read(at, 8))[0]
            if not pte:
                pte = self.page() | RW
                self.u64(at, pte)
            table = pte & vtd.ADDR_MASK
        at = table + 8 * ((iova >> (12 + 9 * (level - 1))) & 0x1FF)
        self.u64(at, phys | bits | (vtd.PTE_LARGE if level > 1 else 0))


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram(128 << 20)
    yield r
    r.close()


def unit(ram: Ram, t: Tables) -> Iommu:
    u = Iommu(ram)
    u.write_reg(vtd.DMAR_RTADDR_REG, t.root)
    u.write_reg(vtd.DMAR_GCMD_REG, vtd.GCMD_SRTP)
    u.write_reg(vtd.DMAR_GCMD_REG, vtd.GCMD_TE)
    assert u.read_reg(vtd.DMAR_GSTS_REG) & (vtd.GCMD_TE | vtd.GCMD_SRTP) == \
        vtd.GCMD_TE | vtd.GCMD_SRTP
    return u


def test_translation_off_is_physical_and_writes_are_logged(ram: Ram) -> None:
    u = Iommu(ram)
    u.dma_write(SRC, 0x3000FF0, b"x" * 32)  # crosses a page: two logged ranges
    assert ram.read(0x3000FF0, 32) == b"x" * 32
    assert u.written() == [(0x3000FF0, 16), (0x3001000, 16)]


@pytest.mark.parametrize("levels", [3, 4])
def test_leaves_of_every_size(ram: Ram, levels: int) -> None:
    t = Tables(ram, levels)
    t.map(0x1000, 0x2000000)
    t.map(0x40000000, 0x4000000, level=2)  # 2 MiB
    t.map(0x80000000, 0, level=3)  # 1 GiB: all of this RAM
    u = unit(ram, t)
    assert u.translate(SRC, 0x1ABC, 4, write=True) == 0x2000ABC
    assert u.translate(SRC, 0x40123456, 8, write=False) == 0x4123456
    assert u.translate(SRC, 0x80000000 + 0x5432100, 8, write=False) == 0x5432100
    u.dma_write(SRC, 0x40001FFC, b"abcdefgh")  # across 4 KiB pages inside one 2 MiB leaf
    assert ram.read(0x4001FFC, 8) == b"abcdefgh" and u.faults == deque()


def test_a_refused_dma_writes_nothing_and_is_logged_with_linuxs_reason(ram: Ram) -> None:
    t = Tables(ram)
    t.map(0x1000, 0x2000000)
    t.map(0x3000, 0x2100000, bits=vtd.PTE_READ)
    u = unit(ram, t)
    with pytest.raises(Translated) as e:
        u.dma_write(SRC, 0x1FFC, b"abcdefgh")  # the second page (0x2000) is not mapped
    assert ram.read(0x2000FFC, 4) == bytes(4) and u.written() == []
    f = e.value.fault
    assert (f.address, f.write, f.reason, f.source) == (0x2000, True, vtd.PTE_NOT_WRITABLE, SRC)
    assert "fault reason 0x05" in f.describe() and "[03:03.0]" in f.describe()
    with pytest.raises(Translated) as e:
        u.dma_write(SRC, 0x3000, b"ro")
    assert e.value.fault.reason == vtd.PTE_NOT_WRITABLE and ram.read(0x2100000, 2) == bytes(2)
    assert u.dma_read(SRC, 0x3000, 2) == bytes(2)  # readable
    with pytest.raises(Translated) as e:
        u.dma_read(SRC, 0x5000, 8)
    assert e.value.fault.reason == vtd.PTE_NOT_READABLE
    assert [x.reason for x in u.faults] == [5, 5, 6] and u.fault_count == 3


def test_every_walk_fault(ram: Ram) -> None:
    t = Tables(ram, levels=3)
    u = unit(ram, t)

    def reason(source: int, iova: int) -> int:
        with pytest.raises(Translated) as e:
            u.translate(source, iova, 8, write=False)
        return e.value.fault.reason

    assert reason(0x0418, 0) == vtd.ROOT_NOT_PRESENT  # bus 4 has no context table
    assert reason(SRC + 1, 0) == vtd.CONTEXT_NOT_PRESENT
    assert reason(SRC, 1 << 39) == vtd.BEYOND_MGAW
    t.u64(t.top, (1 << 40) | RW)  # the next table far outside RAM
    assert reason(SRC, 0) == vtd.NEXT_TABLE_INVALID
    t.u64(t.ctx + 8, 7)  # an address width the unit does not support
    assert reason(SRC, 0) == vtd.CONTEXT_INVALID
    t.u64(t.ctx, t.top | 2 << 2 | 1)  # pass-through
    assert u.translate(SRC, 0x1234, 8, write=True) == 0x1234
    t.u64(t.ctx, t.top | 2)  # not present, fault processing disabled: refused, not logged
    before = u.fault_count
    with pytest.raises(Translated):
        u.translate(SRC, 0, 8, write=False)
    assert u.fault_count == before


def test_the_fault_log_is_bounded_and_says_it_overflowed(ram: Ram) -> None:
    u = unit(ram, Tables(ram))
    for i in range(vtd.FAULT_LOG + 3):
        with pytest.raises(Translated):
            u.translate(SRC, i << 12, 8, write=True)
    assert len(u.faults) == vtd.FAULT_LOG and u.overflowed
    assert u.faults[-1].address == (vtd.FAULT_LOG + 2) << 12


def test_the_root_pointer_is_latched_by_srtp(ram: Ram) -> None:
    t = Tables(ram)
    t.map(0x1000, 0x2000000)
    u = unit(ram, t)
    u.write_reg(vtd.DMAR_RTADDR_REG, 0x7000000)  # an empty page: no root entries
    assert u.translate(SRC, 0x1000, 8, write=False) == 0x2000000  # not latched yet
    u.write_reg(vtd.DMAR_GCMD_REG, vtd.GCMD_SRTP | vtd.GCMD_TE)
    with pytest.raises(Translated) as e:
        u.translate(SRC, 0x1000, 8, write=False)
    assert e.value.fault.reason == vtd.ROOT_NOT_PRESENT
    u.write_reg(vtd.DMAR_GCMD_REG, 0)  # translation off: physical again
    assert u.translate(SRC, 0x1000, 8, write=False) == 0x1000
    with pytest.raises(ValueError):
        u.write_reg(vtd.DMAR_GSTS_REG, 0)
