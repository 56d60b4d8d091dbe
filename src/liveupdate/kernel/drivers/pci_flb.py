"""The PCI core's FLB ``"pci"`` (version 2), as the PCI live update series v9 builds it
(``<20260918200640.887030-1-dmatlack@google.com>``, layout of the stored v8 tree;
docs/posted-series.md 2): registered on the vfio-pci handler, it records the preserved
devices by segment and requester id, so that ``pci_device_shutdown`` leaves them mastering at
the kexec and the next kernel marks them *incoming*.

Outgoing (:class:`PciFlb`): FLB preserve allocates ``struct pci_ser`` (16 bytes,
``kho_alloc_preserve``); ``pci_liveupdate_preserve`` adds an entry with refcount 1 (EBUSY for
an endpoint preserved already; bus 0 has no bridges, so no walk up), unpreserve zeroes it.
The entries are a KHO block set, rewritten (old blocks given back) on every change, with
``devices`` pointing at its head. Frozen at the reboot (``pci_liveupdate_freeze``): EINVAL
afterwards.

Next kernel (:func:`incoming`): the FLB read at boot, before enumeration; a version it does
not read or an entry twice is a panic, as the PCI core's "Failed to retrieve incoming FLB
data". Finish (:meth:`PciFlb.finish`) gives the pages back.

Fault injection (ours): ``pci_lu_ignore_flb`` on the next kernel's command line makes a
kernel that does not honour the PCI FLB -- the vfio-pci and iommufd handlers there, the PCI
core without the series' incoming path (``pci_liveupdate_setup_device`` marks nothing). The
image manifest names no PCI FLB version, so a manifest claiming ``vfio-pci-v1`` (a lying one)
or ``liveupdate_compat=off`` lets an update go to such a kernel. Its defined outcome: the
device is enumerated as a new one, so the VMM's bind of the retrieved file resets it
(``vfio_pci_core_enable``'s FLR: it is not incoming) and the VMM re-initializes it -- the
guest is told and sees the gap; until then its DMA goes through the IOMMU tables the IOMMU
FLB kept, into the guest's preserved memory only.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import kho_block
from liveupdate.abi import pci_flb as ser
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError, LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

NAME = ser.COMPATIBLE
IGNORE = "pci_lu_ignore_flb"  # fault injection: a next kernel that does not honour the FLB


class PciFlb:
    name = NAME

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.head = 0
        self.blocks: list[int] = []
        self.devices: list[int] = []  # requester ids, allocation order (segment 0)
        self.frozen = False

    def preserve(self) -> int:
        self.head = self.k.require_kho().alloc_preserve(ser.SER.size)
        self._write()
        return self.head

    def unpreserve(self, data: int) -> None:
        kout = self.k.require_kho()
        for b in self.blocks:
            kout.unpreserve_free(b, PAGE_SIZE)
        kout.unpreserve_free(self.head, ser.SER.size)
        self.head, self.blocks, self.devices = 0, [], []

    def retrieve(self, data: int) -> None:
        """Read at boot already (:func:`incoming`)."""

    def finish(self, data: int) -> None:
        kin = self.k.kho_in
        try:
            head = ser.decode_ser(self.k.mem.read(data, ser.SER.size, "pci FLB"))
            _, blocks = kho_block.decode(self.k.mem, head.devices, ser.DEV.size,
                                         "pci FLB devices") if head.devices else (b"", [])
        except AbiError:
            return
        for page in (data, *blocks):
            if kin is not None and kin.restore_folio(page) == 0:
                self.k.free_pages(page, 0)

    def _write(self) -> None:
        kout = self.k.require_kho()
        old = self.blocks
        devs = [ser.PciDev(0, bdf, 1) for bdf in self.devices]
        first, pages = ser.encode_devices(devs, lambda: kout.alloc_preserve(PAGE_SIZE)) \
            if devs else (0, {})
        for phys, raw in pages.items():
            self.k.write(phys, raw)
        self.blocks = list(pages)
        self.k.write(self.head, ser.encode_ser(ser.PciSer(ser.VERSION, len(devs), first)))
        for b in old:
            kout.unpreserve_free(b, PAGE_SIZE)

    def add(self, bdf: int) -> None:
        """``pci_liveupdate_preserve``."""
        if self.frozen:
            raise LiveUpdateError(err=errno.EINVAL, msg="pci: preservation is frozen")
        if bdf in self.devices:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"pci {bdf:#06x}: preserved already")
        self.devices.append(bdf)
        try:
            self._write()
        except LiveUpdateError:
            self.devices.remove(bdf)
            raise

    def remove(self, bdf: int) -> None:
        """``pci_liveupdate_unpreserve``."""
        if bdf in self.devices and not self.frozen:
            self.devices.remove(bdf)
            self._write()


def outgoing(k: Kernel) -> PciFlb | None:
    luo = getattr(k.luo, "flbs", None)
    flb = next((f.ops for f in luo.flbs if f.ops.name == NAME), None) if luo else None
    return flb if isinstance(flb, PciFlb) else None


def incoming(k: Kernel) -> set[int]:
    """The requester ids the previous kernel preserved (``pci_liveupdate_setup_device``
    marks each incoming); a FLB that cannot be read is a panic."""
    data = getattr(k.luo, "incoming_flb", lambda name: 0)(NAME)
    if not data:
        return set()
    if k.cmdline.flag(IGNORE):
        k.printk("PCI: incoming FLB not honoured (pci_lu_ignore_flb): the devices the "
                 "previous kernel preserved are enumerated as new")
        return set()
    try:
        head = ser.decode_ser(k.mem.read(data, ser.SER.size, "pci FLB"))
        return {d.bdf for d in ser.decode_devices(k.mem, head) if d.domain == 0}
    except AbiError as e:
        k.panic(f"PCI: Failed to retrieve incoming FLB data: {e.message}")


def kept(k: Kernel) -> set[int]:
    """At the kexec (``pci_liveupdate_freeze``): the devices preserved, preservation frozen;
    ``device_shutdown`` leaves them alone."""
    flb = outgoing(k)
    if flb is None or not flb.head:
        return set()
    flb.frozen = True
    return set(flb.devices)
