"""The vfio-pci LUO file handler ``vfio-pci-v1``, as the VFIO live update series v5 posts it
(``<20260714151505.3466855-7-vipinsh@google.com>`` and 05, 09-11/20; docs/posted-series.md 1),
on ``7.3+posted`` only; the PCI FLB (:mod:`liveupdate.kernel.drivers.pci_flb`) hangs on it.

``preserve`` (a cdev file, bound and attached): the PCI FLB entry, then -- the IOMMU series'
glue -- ``iommu_preserve_device`` (EINVAL unless the device's domain was preserved by an
iommufd earlier in the session), then the 6-byte ``struct vfio_pci_core_device_ser``.

Two modes, by the command line's ``liveupdate_devices=`` (open question 4):

* ``posted`` (the default, the v5 posting): ``freeze`` resets the function and writes
  ``PCI_COMMAND = INTX_DISABLE`` (bus mastering off): DMA stops for the blackout; after the
  update the VMM re-initializes the device. After freeze every use of the file is EIO.
* ``continuous`` (**our deviation**, Orthus-like, phase 4 of the series' roadmap): freeze
  leaves the device running; ``pci_device_shutdown`` skips it (PCI FLB), the IOMMU keeps
  translating through the preserved tables, and the next kernel's bind of the retrieved
  file does not reset it (``vfio_pci_core_enable`` without the FLR). DMA never stops.

``retrieve``: the registered device with the struct's segment and requester id (ENODEV
otherwise), as a new unbound file; such a device is *incoming* until finish, and a plain open
of its cdev is EBUSY (11/20). ``finish`` ends the incoming state and frees the struct.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import vfio_pci as ser
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.drivers import iommu_flb, pci, pci_flb
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.luo.handler import Args
from liveupdate.kernel.vfio.cdev import VFIO_DEVICE_OPS, DeviceFile
from liveupdate.kernel.vfio.pci import continuous

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

PCI_COMMAND_INTX_DISABLE = 1 << 10


class VfioPciHandler:
    compatible = ser.COMPATIBLE
    format = ser.COMPATIBLE
    component = "vfio"

    def __init__(self, k: Kernel, fmt: str) -> None:
        self.k = k

    def can_preserve(self, f: File) -> bool:
        return f.ops is VFIO_DEVICE_OPS

    def preserve(self, a: Args) -> int:
        assert a.file is not None
        df: DeviceFile = a.file.private
        df.need_bound("preserve")
        if df.idev is None or df.idev.hwpt is None:
            raise LiveUpdateError(err=errno.EINVAL, msg="vfio: the device is not attached")
        pflb, iflb = pci_flb.outgoing(self.k), iommu_flb.outgoing(self.k)
        if pflb is None or iflb is None:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="vfio: no PCI or IOMMU FLB")
        bdf = df.dev.bdf
        pflb.add(bdf)
        try:
            iflb.add_device(df.idev.hwpt.domain, bdf, id(df.iommufd) & ((1 << 63) - 1))
        except LiveUpdateError:
            pflb.remove(bdf)
            raise
        df.dev.preserved = True
        return self.k.require_kho().store(ser.encode(ser.VfioPciSer(0, bdf)))

    def unpreserve(self, a: Args) -> None:
        assert a.file is not None
        df: DeviceFile = a.file.private
        for flb in (pci_flb.outgoing(self.k), iommu_flb.outgoing(self.k)):
            if flb is not None:
                if isinstance(flb, pci_flb.PciFlb):
                    flb.remove(df.dev.bdf)
                else:
                    flb.remove_device(df.dev.bdf)
        df.dev.preserved = False
        self.k.require_kho().unpreserve_free(a.data, ser.SER.size)

    def freeze(self, a: Args) -> int:
        """As posted: reset, bus mastering off. Continuous: the device left running."""
        assert a.file is not None
        df: DeviceFile = a.file.private
        df.frozen = True
        if not continuous(self.k):
            df.dev.flr()
            df.dev.config_write(pci.PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE)
            self.k.printk(f"vfio-pci {df.dev.name}: reset at freeze (bus mastering off)")
        else:
            self.k.printk(f"vfio-pci {df.dev.name}: left running at freeze (continuous)")
        return a.data

    def unfreeze(self, a: Args) -> None:
        assert a.file is not None
        df: DeviceFile = a.file.private
        df.frozen = False  # the device stays as freeze left it: userspace re-initializes

    def retrieve(self, a: Args) -> File:
        try:
            s = ser.decode(self.k.mem.read(a.data, ser.SER.size, "vfio-pci-v1"))
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=e.message) from e
        dev = next((d for d in self.k.vfio if d.bdf == s.bdf and s.domain == 0), None)
        if dev is None:
            raise LiveUpdateError(err=errno.ENODEV, msg=f"vfio: no device {s} bound to "
                                  "vfio-pci")
        return File(VFIO_DEVICE_OPS, DeviceFile(dev, retrieved=True))

    def finish(self, a: Args) -> None:
        try:
            s = ser.decode(self.k.mem.read(a.data, ser.SER.size, "vfio-pci-v1"))
        except AbiError:
            return
        for dev in self.k.vfio:
            if dev.bdf == s.bdf:
                dev.incoming = False
        kin = self.k.kho_in
        if kin is not None and kin.restore_folio(a.data) == 0:
            self.k.free_pages(a.data, 0)
