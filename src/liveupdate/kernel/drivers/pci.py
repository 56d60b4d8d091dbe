"""PCI: enumeration at boot and the shutdown a kexec does, as Linux's PCI core does them.

Enumeration reads the vendor id of every slot of bus 0 through config space (the link's
``pci_scan``: the scan's reads in one round trip; an empty slot reads all ones, as
``pci_bus_read_dev_vendor_id`` expects), then the class of each function that answers, and
logs each function as ``pci_setup_device`` does (``pci 0000:BB:DD.F: [vvvv:dddd] type 00
class 0x......``). At a kexec, ``pci_device_shutdown`` clears bus mastering of every device
(``if (kexec_in_progress && ...) pci_clear_master(pci_dev)``), so a device the next kernel
does not know stops writing memory that is no longer its; the devices a live update
preserves (the PCI FLB of the posted series, issue #25) will be skipped here.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.errors import LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

PCI_VENDOR_ID, PCI_COMMAND, PCI_CLASS_REVISION = 0x00, 0x04, 0x08
PCI_COMMAND_MASTER = 1 << 2
SLOTS = 32


def config_read(k: Kernel, bdf: int, offset: int, size: int) -> int:
    """``pci_read_config_*``: through the link (the machine's ECAM window)."""
    assert k.link is not None
    value: int = k.link.call({"op": "pci_read", "bdf": bdf, "offset": offset,
                              "size": size})["value"]
    return value


def config_reads(k: Kernel, reads: list[tuple[int, int, int]]) -> list[int]:
    """Several ``pci_read_config_*`` of a scan (bdf, offset, size each), in one link round
    trip (the link's ``pci_scan``): a deviation in cost only -- each is the read Linux makes."""
    assert k.link is not None
    values = k.link.call({"op": "pci_scan", "reads": [list(r) for r in reads]}).get("values")
    if not isinstance(values, list) or len(values) != len(reads) or \
            not all(type(v) is int for v in values):
        raise LiveUpdateError(err=errno.EIO, msg="pci_scan: the bus answered "
                              f"{values!r:.80} to {len(reads)} reads")
    return values


def config_write(k: Kernel, bdf: int, offset: int, size: int, value: int) -> None:
    """``pci_write_config_*``."""
    assert k.link is not None
    k.link.call({"op": "pci_write", "bdf": bdf, "offset": offset, "size": size,
                 "value": value})


def _name(bdf: int) -> str:
    return f"0000:{bdf >> 8:02x}:{(bdf >> 3) & 31:02x}.{bdf & 7}"


def enumerate_bus(k: Kernel) -> None:
    """Every function 0 on bus 0 that answers, into ``k.pci``."""
    k.pci = []
    if k.link is None:  # the in-process rig has no hardware
        return
    slots = [slot << 3 for slot in range(SLOTS)]
    try:
        found = [(bdf, ids) for bdf, ids in zip(
            slots, config_reads(k, [(bdf, PCI_VENDOR_ID, 4) for bdf in slots]), strict=True)
            if ids & 0xFFFF not in (0xFFFF, 0)]
        classes = config_reads(k, [(bdf, PCI_CLASS_REVISION, 4) for bdf, _ in found]) \
            if found else []
    except LiveUpdateError as e:  # a bus that does not answer: no devices, said so
        k.printk(f"pci 0000:00: bus scan failed: {e}")
        return
    for (bdf, ids), revision in zip(found, classes, strict=True):
        klass = revision >> 8
        k.printk(f"pci {_name(bdf)}: [{ids & 0xFFFF:04x}:{ids >> 16:04x}] type 00 "
                 f"class {klass:#08x}")
        k.pci.append(bdf)


def shutdown(k: Kernel, kept: set[int] | None = None) -> None:
    """``pci_device_shutdown`` at a kexec: bus mastering off on every device but those a
    live update preserves (``kept``: the PCI FLB's). It cannot fail the reboot
    (``device_shutdown`` returns nothing): a device that does not answer is logged and the
    next one shut down."""
    for bdf in k.pci:
        if kept and bdf in kept:
            k.printk(f"pci {_name(bdf)}: preserved, left as it is (kexec)")
            continue
        try:
            command = config_read(k, bdf, PCI_COMMAND, 2)
            if command & PCI_COMMAND_MASTER:
                config_write(k, bdf, PCI_COMMAND, 2, command & ~PCI_COMMAND_MASTER)
                k.printk(f"pci {_name(bdf)}: bus mastering off (kexec)")
        except LiveUpdateError as e:
            k.printk(f"pci {_name(bdf)}: shutdown failed: {e}")
