"""The posted series' formats (docs/posted-series.md), against golden bytes written out from
the postings' field tables -- not from our codecs -- and decoded back; and what each refuses
(the errno the posting's retrieve gives, or AbiError for a blob that cannot be read)."""

from __future__ import annotations

import errno

import pytest

from liveupdate.abi import iommu_flb, iommufd, pci_flb, vfio_pci
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError
from tests.conftest import FakeRam


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def test_vfio_pci_v1_is_segment_then_bdf() -> None:
    golden = le(0x0001, 4) + le(0x0318, 2)  # 0001:03:03.0
    ser = vfio_pci.VfioPciSer(domain=1, bdf=0x0318)
    assert vfio_pci.encode(ser) == golden and len(golden) == 6
    assert vfio_pci.decode(golden + bytes(4090)) == ser and str(ser) == "0001:03:03.0"
    with pytest.raises(AbiError):
        vfio_pci.decode(golden[:5])


def test_pci_flb_ser_and_its_device_blocks() -> None:
    golden = le(2, 4) + le(3, 4) + le(0x201000, 8)
    ser = pci_flb.PciSer(version=2, nr_devices=3, devices=0x201000)
    assert pci_flb.encode_ser(ser) == golden and pci_flb.decode_ser(golden) == ser
    with pytest.raises(AbiError) as e:
        pci_flb.decode_ser(le(1, 4) + golden[4:])  # version 1: the first patch's
    assert e.value.errno == errno.EINVAL
    ram = FakeRam(pages=8, base=0x200000)
    devs = [pci_flb.PciDev(0, 0x0010, 1), pci_flb.PciDev(0, 0x0018, 0),  # a freed slot
            pci_flb.PciDev(0, 0x0100, 2), pci_flb.PciDev(1, 0x0318, 1)]
    first, pages = pci_flb.encode_devices(devs, ram.alloc)
    for phys, page in pages.items():
        ram.put(phys, page)
    block = pages[first]
    assert block[:16] == le(0, 8) + le(4, 8)  # next, count: one block
    assert block[16:24] == le(0, 4) + le(0x0010, 2) + le(1, 2)  # domain, bdf, refcount
    live = pci_flb.decode_devices(ram.mem(), pci_flb.PciSer(2, 3, first))
    assert [(d.domain, d.bdf) for d in live] == [(0, 0x10), (0, 0x100), (1, 0x318)]
    with pytest.raises(AbiError) as e:
        pci_flb.decode_devices(ram.mem(), pci_flb.PciSer(2, 4, first))
    assert e.value.errno == errno.EINVAL  # nr_devices says 4
    twice, pages = pci_flb.encode_devices([devs[0], devs[0]], ram.alloc)
    for phys, page in pages.items():
        ram.put(phys, page)
    with pytest.raises(AbiError) as e:
        pci_flb.decode_devices(ram.mem(), pci_flb.PciSer(2, 2, twice))
    assert e.value.errno == errno.EBUSY
    assert pci_flb.decode_devices(ram.mem(), pci_flb.PciSer(2, 0, 0)) == []


def test_iommufd_v1_count_then_hwpts() -> None:
    golden = le(2, 8) + le(0x300040, 8) + le(7, 8) + bytes(8) + \
        le(0x300068, 8) + le(2**64 - 1, 8) + b"\x01" + bytes(7)
    hwpts = [iommufd.Hwpt(0x300040, 7), iommufd.Hwpt(0x300068, 2**64 - 1, True)]
    assert iommufd.encode(hwpts) == golden and iommufd.decode(golden) == hwpts
    assert iommufd.size(2) == 4096
    for bad in (golden[:7], le(3, 8) + golden[8:], le(1, 8) + bytes(24)):
        with pytest.raises(AbiError):
            iommufd.decode(bad)


def test_iommu_flb_lists_units_domains_and_devices() -> None:
    ram = FakeRam(pages=8, base=0x300000)
    flb, units, domains, devices = (ram.alloc() for _ in range(4))
    unit_golden = (le(1, 4) + le(0, 4) + le(0xFED90000, 8) + le(1, 8)  # hdr, token, INTEL
                   + b"\x00" + bytes(7) + le(0xFED90000, 8) + le(0x500000, 8)
                   + le(1 << 6, 8) + bytes(56))  # bit 6: bus 3, lower context table
    assert iommu_flb.encode_unit(0xFED90000, 0x500000, {6}) == unit_golden
    assert len(unit_golden) == 112
    dom = iommu_flb.encode_domain(0x600000, 3)
    assert dom == le(1, 4) + le(0, 4) + le(0x600000, 8) + le(3, 8) + le(48, 4) + bytes(4) + \
        bytes(8)
    deleted = le(1, 4) + le(iommu_flb.FLAG_DELETED, 4) + bytes(32)
    unit_phys, dom_phys = units + 16, domains + 16 + 40  # the second domain is the live one
    dev = iommu_flb.encode_device(0x0318, 5, dom_phys, unit_phys, token=9)
    assert len(dev) == 72 and dev[8:16] == le(0x0318, 4) + le(0, 4)
    ram.put(flb, iommu_flb.encode_flb(units, domains, devices))
    ram.put(units, iommu_flb.encode_array([unit_golden]))
    ram.put(domains, iommu_flb.encode_array([deleted, dom]))
    ram.put(devices, iommu_flb.encode_array([dev]))
    got = iommu_flb.decode(ram.mem(), flb)
    assert [(u.token, u.root_table, u.context_tables) for u in got.units] == \
        [(0xFED90000, 0x500000, frozenset({6}))]
    assert [(d.phys, d.top_table, d.top_level) for d in got.domains] == [(dom_phys, 0x600000, 3)]
    assert [(d.devid, d.did, d.domain, d.dma_owner_token) for d in got.devices] == \
        [(0x0318, 5, dom_phys, 9)]
    ram.put(devices, iommu_flb.encode_array([iommu_flb.encode_device(0x0318, 5, domains + 16,
                                                                      unit_phys)]))
    with pytest.raises(AbiError) as e:  # points at the deleted domain
        iommu_flb.decode(ram.mem(), flb)
    assert e.value.errno == errno.EINVAL
    for head in (iommu_flb.FLB.pack(2, units, domains, devices),
                 iommu_flb.FLB.pack(1, units, 0, devices)):
        ram.put(flb, head)
        with pytest.raises(AbiError) as e:
            iommu_flb.decode(ram.mem(), flb)
        assert e.value.errno == errno.EINVAL
    ram.put(flb, iommu_flb.encode_flb(units, domains, devices))
    ram.put(units, iommu_flb.ARRAY.pack(units, 1))  # a list that loops on itself
    with pytest.raises(AbiError):
        iommu_flb.decode(ram.mem(), flb)


def test_mem_is_physmem() -> None:
    assert isinstance(FakeRam().mem(), PhysMem)
