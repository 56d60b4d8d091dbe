"""The NIC: its config space as software probes it, packets into a descriptor ring (directly
and through the IOMMU), drops counted as the gaps in the sequence, DMA stopped by bus master
off and by reset, refused DMA counted and logged, and the source's own pace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from liveupdate.machine import pci
from liveupdate.machine.iommu import Iommu
from liveupdate.machine.nic import (
    BAR_SIZE,
    CLASS_ETHERNET,
    DD,
    DESC,
    DEVICE,
    PACKET,
    VENDOR,
    Nic,
    check_packet,
)
from liveupdate.machine.ram import Ram
from tests.machine.test_iommu import SRC, Tables, unit

RING, BUFS = 0x800000, 0x900000


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram(128 << 20)
    yield r
    r.close()


def driver(ram: Ram, nic: Nic, entries: int, ring: int = RING, bufs: int = BUFS) -> None:
    """What a driver does: descriptors with buffers, the ring programmed, receive and bus
    mastering on (ring and buffers at these DMA addresses; RAM offsets when untranslated)."""
    for i in range(entries):
        ram.write(ring + DESC.size * i, DESC.pack(bufs + 0x100 * i, 0x100, 0, 0))
    nic.reg_write("RING_LO", ring)
    nic.reg_write("RING_SIZE", entries)
    nic.reg_write("CTRL", 1)
    nic.config_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MASTER | pci.PCI_COMMAND_MEMORY)


def consume(ram: Ram, entries: int, ring: int = RING) -> list[int]:
    """The driver's side: sequence numbers of the done descriptors, in ring order, each
    given back (DD cleared)."""
    seqs = []
    for i in range(entries):
        buf, length, written, flags = DESC.unpack(ram.read(ring + DESC.size * i, DESC.size))
        if flags & DD:
            seqs.append(check_packet(ram.read(buf, written)))
            ram.write(ring + DESC.size * i, DESC.pack(buf, length, 0, 0))
    return seqs


def test_config_space_as_software_probes_it(ram: Ram) -> None:
    nic = Nic(pci.bdf("03:03.0"), Iommu(ram), rate=1000)
    assert nic.source == SRC
    assert nic.config_read(pci.PCI_VENDOR_ID, 2) == VENDOR
    assert nic.config_read(pci.PCI_DEVICE_ID, 2) == DEVICE
    assert nic.config_read(pci.PCI_CLASS_REVISION, 4) >> 8 == CLASS_ETHERNET
    nic.config_write(pci.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)  # sizing
    assert nic.config_read(pci.PCI_BASE_ADDRESS_0, 4) == (~(BAR_SIZE - 1)) & 0xFFFFFFF0
    nic.config_write(pci.PCI_COMMAND, 2, 0xFFFF)  # only the writable bits stick
    assert nic.config_read(pci.PCI_COMMAND, 2) == pci.COMMAND_WRITABLE and nic.bus_master
    nic.config_write(pci.PCI_VENDOR_ID, 2, 0x1234)
    assert nic.config_read(pci.PCI_VENDOR_ID, 2) == VENDOR
    with pytest.raises(ValueError):
        nic.config_read(0x3, 2)  # unaligned
    with pytest.raises(ValueError):
        pci.bdf("00:20.0")


def test_packets_land_in_order_and_a_full_ring_drops_what_the_gaps_show(ram: Ram) -> None:
    u = Iommu(ram)  # translation off: DMA addresses are physical
    nic = Nic(SRC, u, rate=1000)
    driver(ram, nic, 4)
    nic.receive(6)  # two more than the ring holds
    assert nic.reg_read("DELIVERED") == 4 and nic.reg_read("DROPS") == 2
    assert consume(ram, 4) == [0, 1, 2, 3]
    nic.receive(3)
    got = consume(ram, 4)
    assert got == [6, 7, 8]  # 4 and 5 were dropped: the gap equals the drop counter
    assert got[0] - 3 - 1 == nic.reg_read("DROPS")
    # every DMA write inside the ring or the buffers the driver gave
    inside = [(RING, RING + 4 * DESC.size), (BUFS, BUFS + 4 * 0x100)]
    assert all(any(lo <= p and p + n <= hi for lo, hi in inside) for p, n in u.written())
    assert len(u.written()) == 2 * 7  # a packet and its descriptor each


def test_bus_master_off_and_reset_stop_dma(ram: Ram) -> None:
    u = Iommu(ram)
    nic = Nic(SRC, u, rate=1000)
    driver(ram, nic, 8)
    nic.config_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MEMORY)  # pci_device_shutdown's way
    nic.receive(2)
    assert nic.reg_read("DROPS") == 2 and u.written() == []
    driver(ram, nic, 8)
    nic.receive(1)
    nic.reset()
    assert not nic.bus_master and nic.reg_read("RING_SIZE") == 0
    nic.receive(1)
    assert len(u.written()) == 2 and consume(ram, 8) == [2]


def test_dma_through_the_iommu_and_a_refused_buffer(ram: Ram) -> None:
    t = Tables(ram)
    t.map(0x10000, 0x2000000)  # the ring at DMA 0x10000
    t.map(0x20000, 0x2100000)  # the first buffer page: descriptors 0..15
    u = unit(ram, t)
    nic = Nic(SRC, u, rate=1000)
    # driver's view through its own mapping: write the ring where DMA 0x10000 lands
    for i in range(32):
        ram.write(0x2000000 + DESC.size * i, DESC.pack(0x20000 + 0x100 * i, 0x100, 0, 0))
    nic.reg_write("RING_LO", 0x10000)
    nic.reg_write("RING_SIZE", 32)
    nic.reg_write("CTRL", 1)
    nic.config_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_MASTER)
    nic.receive(17)  # the 17th buffer (DMA 0x21000) is not mapped
    assert nic.reg_read("DELIVERED") == 16 and nic.reg_read("DMA_ERRORS") == 1
    assert [f.address for f in u.faults] == [0x21000] and u.faults[0].source == SRC
    assert all(0x2000000 <= p < 0x2001000 or 0x2100000 <= p < 0x2101000
               for p, _ in u.written())
    assert check_packet(ram.read(0x2100000 + 0x100 * 15, PACKET.size)) == 15


def test_the_source_sends_at_its_rate_whoever_receives(ram: Ram) -> None:
    u = Iommu(ram)
    nic = Nic(SRC, u, rate=2000)
    driver(ram, nic, 1024)
    nic.start()
    try:
        assert nic.wait_sent(200, timeout=30)
    finally:
        nic.stop()
    sent = nic.sent
    assert nic.reg_read("DELIVERED") + nic.reg_read("DROPS") == sent
    assert consume(ram, 1024)[:200] == list(range(200)) and not u.faults
