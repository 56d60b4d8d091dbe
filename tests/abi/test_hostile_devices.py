"""Hostile handovers of the posted devices series (``7.3+posted``), as tests/abi/test_hostile.py
does for the rest: the IOMMU FLB, the PCI FLB, ``iommufd-v1`` and ``vfio-pci-v1`` built valid
in RAM, then one invariant broken each -- refused by the decoder with its reason (an AbiError
naming the broken thing), never another exception. The next kernel panics on the FLBs'
refusals (the series' BUG and "Failed to retrieve incoming FLB data")."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from liveupdate.abi import iommu_flb, iommufd, pci_flb, vfio_pci
from liveupdate.errors import AbiError
from tests.conftest import FakeRam

OUTSIDE = 0x7FFF_0000_0000
Damage = Callable[[FakeRam, dict[str, int]], None]


def _iommu(damage: Damage) -> iommu_flb.IommuFlb:
    """A unit, a domain and a device, each list one page; ``damage`` gets their pages."""
    ram = FakeRam(pages=16)
    at = {n: ram.alloc() for n in ("flb", "units", "domains", "devices", "root", "top")}
    unit = at["units"] + iommu_flb.ARRAY.size
    dom = at["domains"] + iommu_flb.ARRAY.size
    ram.put(at["units"], iommu_flb.encode_array([iommu_flb.encode_unit(0xFED90000,
                                                                       at["root"], {0})]))
    ram.put(at["domains"], iommu_flb.encode_array([iommu_flb.encode_domain(at["top"], 3)]))
    ram.put(at["devices"], iommu_flb.encode_array([iommu_flb.encode_device(0x18, 1, dom,
                                                                           unit)]))
    ram.put(at["flb"], iommu_flb.encode_flb(at["units"], at["domains"], at["devices"]))
    damage(ram, at)
    return iommu_flb.decode(ram.mem(), at["flb"])


def _pci(damage: Callable[[FakeRam, int, int], None]) -> list[pci_flb.PciDev]:
    ram = FakeRam(pages=8)
    first, pages = pci_flb.encode_devices([pci_flb.PciDev(0, 0x18, 1),
                                           pci_flb.PciDev(0, 0x20, 1)], ram.alloc)
    for phys, raw in pages.items():
        ram.put(phys, raw)
    head = ram.alloc()
    ram.put(head, pci_flb.encode_ser(pci_flb.PciSer(2, 2, first)))
    damage(ram, head, first)
    mem = ram.mem()
    return pci_flb.decode_devices(mem, pci_flb.decode_ser(mem.read(head, 16)))


CASES: dict[str, tuple[Callable[[], object], str]] = {
    "IOMMU FLB: another version": (
        lambda: _iommu(lambda r, a: r.put(a["flb"], struct.pack("<Q", 2))), "version"),
    "IOMMU FLB: a list without its first page": (
        lambda: _iommu(lambda r, a: r.put(a["flb"] + 16, struct.pack("<Q", 0))),
        "no first page"),
    "IOMMU FLB: more objects than a page holds": (
        lambda: _iommu(lambda r, a: r.put(a["devices"] + 8, struct.pack("<Q", 57))),
        "fit"),
    "IOMMU FLB: an array chain that loops": (
        lambda: _iommu(lambda r, a: r.put(a["domains"], struct.pack("<Q", a["domains"]))),
        "loop"),
    "IOMMU FLB: a next page outside RAM": (
        lambda: _iommu(lambda r, a: r.put(a["units"], struct.pack("<Q", OUTSIDE))),
        "outside"),
    "IOMMU FLB: a device pointing at a domain it does not hold": (
        lambda: _iommu(lambda r, a: r.put(a["devices"] + 16 + 32, struct.pack("<Q", 0x8))),
        "does not hold"),
    "IOMMU FLB: a device whose domain was deleted": (
        lambda: _iommu(lambda r, a: r.put(a["domains"] + 16 + 4, struct.pack("<I", 1))),
        "does not hold"),
    "PCI FLB: another version": (
        lambda: _pci(lambda r, h, f: r.put(h, struct.pack("<I", 1))), "version"),
    "PCI FLB: a device listed twice": (
        lambda: _pci(lambda r, h, f: r.put(f + 16 + 8, struct.pack("<IHH", 0, 0x18, 1))),
        "twice"),
    "PCI FLB: nr_devices that contradicts the entries": (
        lambda: _pci(lambda r, h, f: r.put(h + 4, struct.pack("<I", 3))), "nr_devices"),
    "PCI FLB: the block set outside RAM": (
        lambda: _pci(lambda r, h, f: r.put(h + 8, struct.pack("<Q", OUTSIDE))), "outside"),
    "iommufd-v1: more HWPTs than its bytes": (
        lambda: iommufd.decode(struct.pack("<Q", 2) + bytes(24)), "do not fit"),
    "iommufd-v1: a HWPT without its domain": (
        lambda: iommufd.decode(iommufd.encode([iommufd.Hwpt(0, 1)])), "domain_data"),
    "vfio-pci-v1: shorter than its struct": (
        lambda: vfio_pci.decode(bytes(5)), "the struct is"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_is_refused_with_its_reason(case: str) -> None:
    build, reason = CASES[case]
    with pytest.raises(AbiError) as e:
        build()
    assert reason.lower() in e.value.message.lower(), e.value.message


def test_the_valid_structures_decode() -> None:
    flb = _iommu(lambda r, a: None)
    assert [d.devid for d in flb.devices] == [0x18] and flb.units[0].context_tables == {0}
    assert [d.bdf for d in _pci(lambda r, h, f: None)] == [0x18, 0x20]
