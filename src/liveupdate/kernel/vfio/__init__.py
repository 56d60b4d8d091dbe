"""VFIO: vfio-pci and its device cdev bound to iommufd, and the LUO handlers of both."""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.kernel.drivers import iommu_flb, pci_flb
from liveupdate.kernel.iommufd.fops import open_iommufd
from liveupdate.kernel.iommufd.luo import IommufdHandler
from liveupdate.kernel.luo.handler import register_file_handler
from liveupdate.kernel.luo.session import LuoSessions
from liveupdate.kernel.vfio import cdev, pci
from liveupdate.kernel.vfio.luo import VfioPciHandler

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

DEV_IOMMU = "/dev/iommu"


def init(k: Kernel) -> None:
    """At boot, after PCI enumeration and the IOMMU driver (and LUO, whose incoming FLBs
    they read): ``/dev/iommu`` (iommufd is built in; the posted series adds ``MARK_PRESERVE``
    where LUO has its handler, i.e. ``7.3+posted`` with ``liveupdate=on``), a cdev per
    function vfio-pci claims (``vfio-pci.ids``), and the FLBs the handlers carry -- the
    IOMMU FLB on iommufd's, the PCI FLB on vfio-pci's."""
    luo = k.luo
    mine = {h.compatible for h in luo.handlers} if isinstance(luo, LuoSessions) else set()
    posted = IommufdHandler.compatible in mine  # the LUO row builds the posted handlers
    k.chrdevs[DEV_IOMMU] = lambda: open_iommufd(k.iommu, posted)
    k.vfio = pci.probe(k, pci_flb.incoming(k))
    for dev in k.vfio:
        k.chrdevs[dev.path] = lambda dev=dev: cdev.open_device(dev)  # type: ignore[misc]
    if isinstance(luo, LuoSessions) and luo.has_flb:
        for handler, flb in ((IommufdHandler.compatible, iommu_flb.IommuFlb(k)),
                             (VfioPciHandler.compatible, pci_flb.PciFlb(k))):
            if handler in mine:
                luo.flbs.register(handler, flb)


def luo_init() -> None:
    """The handlers' initcall (``iommufd_liveupdate_init``, vfio-pci's registration):
    registered by format; only generations whose row names the format build them."""
    register_file_handler("iommufd", ("iommufd-v1",), IommufdHandler)
    register_file_handler("vfio", ("vfio-pci-v1",), VfioPciHandler)
