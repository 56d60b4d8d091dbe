"""VFIO: vfio-pci and its device cdev, bound to iommufd."""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.kernel.iommufd.fops import open_iommufd
from liveupdate.kernel.vfio import cdev, pci

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

DEV_IOMMU = "/dev/iommu"


def init(k: Kernel) -> None:
    """At boot, after PCI enumeration and the IOMMU driver: ``/dev/iommu`` (iommufd is
    built in; the posted series adds its ``MARK_PRESERVE`` command on ``7.3+posted``) and
    a cdev per function vfio-pci claims (``vfio-pci.ids``)."""
    posted = "iommufd-v1" in k.gen.luo.files
    k.chrdevs[DEV_IOMMU] = lambda: open_iommufd(k.iommu, posted)
    k.vfio = pci.probe(k)
    for dev in k.vfio:
        k.chrdevs[dev.path] = lambda dev=dev: cdev.open_device(dev)  # type: ignore[misc]
