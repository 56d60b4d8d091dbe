"""Reports of the posted series' file formats (``7.3+posted``; docs/posted-series.md): the
serialized data of a preserved VFIO PCI device (``vfio-pci-v1``) and of an iommufd
(``iommufd-v1``). Each takes the raw bytes of the preserved allocation and, as every
describer of :mod:`liveupdate.tools.report`, fails with AbiError on hostile bytes."""

from __future__ import annotations

from typing import Any

from liveupdate.abi import iommufd, vfio_pci
from liveupdate.abi.physmem import PhysMem

Report = dict[str, Any]


def describe_vfio_pci(raw: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    ser = vfio_pci.decode(raw)
    return {"kind": "vfio-pci-v1", "compatible": vfio_pci.COMPATIBLE, "device": str(ser),
            "domain": ser.domain, "bdf": f"{ser.bdf:#06x}"}


def describe_iommufd(raw: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    hwpts = iommufd.decode(raw)
    return {"kind": "iommufd-v1", "compatible": iommufd.COMPATIBLE, "hwpts": [
        {"domain_data": f"{h.domain_data:#x}", "token": f"{h.token:#x}",
         "reclaimed": h.reclaimed} for h in hwpts]}
