"""What a kernel may ask of its hardware over the link (``Bus.access``), and the answers to
garbage: every malformed request is one errno and message, nothing changes, and no request
reaches the bug path."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.machine import pci
from liveupdate.machine.devices import Bus
from liveupdate.machine.ram import Ram

NIC = 0x18  # 00:03.0


@pytest.fixture
def bus() -> Iterator[Bus]:
    ram = Ram(128 << 20)
    yield Bus(ram, [{"kind": "nic", "bdf": "00:03.0", "rate": 1000}])
    ram.close()


def ask(bus: Bus, bugs: list[str], **h: object) -> dict[str, object]:
    return bus.access(dict(h), on_bug=bugs.append)


def test_config_space_bars_and_iommu_registers(bus: Bus) -> None:
    bugs: list[str] = []
    assert ask(bus, bugs, op="pci_read", bdf=NIC, offset=0, size=2)["value"] == 0x1B36
    assert ask(bus, bugs, op="pci_read", bdf=0x20, offset=0, size=4)["value"] == 0xFFFFFFFF
    assert ask(bus, bugs, op="bar_read", bdf=NIC, reg="CTRL")["errno"] == errno.EIO
    ask(bus, bugs, op="pci_write", bdf=NIC, offset=4, size=2, value=pci.PCI_COMMAND_MEMORY)
    assert ask(bus, bugs, op="bar_write", bdf=NIC, reg="RING_SIZE", value=64)["errno"] == 0
    assert ask(bus, bugs, op="bar_read", bdf=NIC, reg="RING_SIZE")["value"] == 64
    assert ask(bus, bugs, op="iommu_write", offset=0x20, value=0x5000)["errno"] == 0
    assert ask(bus, bugs, op="iommu_read", offset=0x20)["value"] == 0x5000
    assert bugs == []


def test_a_scan_answers_each_read_as_pci_read_does(bus: Bus) -> None:
    bugs: list[str] = []
    reads = [[slot << 3, off, 4] for slot in range(32) for off in (0, 8)]
    alone = [ask(bus, bugs, op="pci_read", bdf=b, offset=o, size=n)["value"]
             for b, o, n in reads]
    assert ask(bus, bugs, op="pci_scan", reads=reads)["values"] == alone
    assert alone.count(0xFFFFFFFF) == 62 and bugs == []  # one function answers


@pytest.mark.parametrize(("request_", "err"), [
    ({"op": "pci_read", "bdf": NIC, "offset": 0, "size": 10**10}, errno.EINVAL),
    ({"op": "pci_read", "bdf": NIC, "offset": -4, "size": 4}, errno.EINVAL),
    ({"op": "pci_read", "bdf": NIC, "offset": 1, "size": 4}, errno.EINVAL),
    ({"op": "pci_read", "bdf": 0x20, "offset": 0, "size": 1 << 40}, errno.EINVAL),
    ({"op": "pci_read", "bdf": "00:03.0", "offset": 0, "size": 4}, errno.EINVAL),
    ({"op": "pci_scan", "reads": [[NIC, 1, 4]]}, errno.EINVAL),
    ({"op": "pci_scan", "reads": [[NIC, 0]]}, errno.EINVAL),
    ({"op": "pci_scan", "reads": [[NIC, 0, 4]] * 257}, errno.EINVAL),
    ({"op": "pci_scan", "reads": "all"}, errno.EINVAL),
    ({"op": "pci_write", "bdf": NIC, "offset": 4, "size": 2, "value": "x"}, errno.EINVAL),
    ({"op": "pci_write", "bdf": NIC, "offset": 4, "size": 2}, errno.EINVAL),
    ({"op": "bar_write", "bdf": NIC, "reg": "DROPS", "value": 0}, errno.EIO),
    ({"op": "iommu_write", "offset": 0x34, "value": 1}, errno.EINVAL),
    ({"op": "iommu_read", "offset": None}, errno.EINVAL),
    ({"op": "format_disk"}, errno.ENOSYS),
    ({"op": 7}, errno.ENOSYS),
])
def test_garbage_is_an_errno_and_changes_nothing(bus: Bus, request_: dict[str, object],
                                                 err: int) -> None:
    bugs: list[str] = []
    before = bus.status()
    got = bus.access(request_, on_bug=bugs.append)
    assert got["errno"] == err and got["message"], got
    assert bus.status() == before and bugs == []


def test_a_register_write_the_nic_refuses_is_einval(bus: Bus) -> None:
    bugs: list[str] = []
    ask(bus, bugs, op="pci_write", bdf=NIC, offset=4, size=2, value=pci.PCI_COMMAND_MEMORY)
    got = ask(bus, bugs, op="bar_write", bdf=NIC, reg="RING_SIZE", value=3)  # not a power of 2
    assert got["errno"] == errno.EINVAL and "power of two" in str(got["message"])
    assert ask(bus, bugs, op="bar_read", bdf=NIC, reg="RING_SIZE")["value"] == 0 and bugs == []


def test_a_bad_device_list_makes_nothing() -> None:
    ram = Ram(128 << 20)
    try:
        for devices in ("nic", [{"kind": "gpu"}], [{"kind": "nic", "bdf": "00:03.1"}],
                        [{"kind": "nic", "bdf": "00:03.0", "rate": float("inf")}],
                        [{"kind": "nic", "bdf": "00:03.0"}, {"kind": "nic", "bdf": "00:03.0"}]):
            with pytest.raises(LiveUpdateError) as e:
                Bus(ram, devices)
            assert e.value.errno == errno.EINVAL
    finally:
        ram.close()
