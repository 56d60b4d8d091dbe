"""Reports of the posted series' file formats (``7.3+posted``; docs/posted-series.md): the
serialized data of a preserved VFIO PCI device (``vfio-pci-v1``) and of an iommufd
(``iommufd-v1``), and the data of their FLBs followed through RAM (``pci``,
``iommu-liveupdate``: :func:`describe_flb`). Each takes the raw bytes of the preserved
allocation (an FLB: its data's address and RAM) and, as every describer of
:mod:`liveupdate.tools.report`, fails with AbiError on hostile bytes."""

from __future__ import annotations

from typing import Any

from liveupdate.abi import iommu_flb, iommufd, pci_flb, vfio_pci
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


def _pci_flb(mem: PhysMem, data: int) -> Report:
    head = pci_flb.decode_ser(mem.read(data, pci_flb.SER.size, "pci FLB"))
    return {"kind": "pci-flb", "version": head.version, "nr_devices": head.nr_devices,
            "devices": [{"domain": d.domain, "bdf": f"{d.bdf:#06x}", "refcount": d.refcount}
                        for d in pci_flb.decode_devices(mem, head)]}


def _iommu_flb(mem: PhysMem, data: int) -> Report:
    flb = iommu_flb.decode(mem, data)
    return {"kind": "iommu-flb", "version": iommu_flb.VERSION,
            "units": [{"at": f"{u.phys:#x}", "token": f"{u.token:#x}", "type": u.type,
                       "root_table": f"{u.root_table:#x}",
                       "context_tables": sorted(u.context_tables)} for u in flb.units],
            "domains": [{"at": f"{d.phys:#x}", "top_table": f"{d.top_table:#x}",
                         "top_level": d.top_level, "vasz": d.vasz} for d in flb.domains],
            "devices": [{"devid": f"{d.devid:#06x}", "segment": d.segment, "did": d.did,
                         "domain": f"{d.domain:#x}", "unit": f"{d.unit:#x}"}
                        for d in flb.devices]}


FLB_DESCRIBERS = {pci_flb.COMPATIBLE: _pci_flb, iommu_flb.COMPATIBLE: _iommu_flb}


def describe_flb(mem: PhysMem | None, name: str, data: int) -> Report | None:
    """An FLB's data decoded (None: not a devices FLB, or no RAM to follow it in)."""
    fn = FLB_DESCRIBERS.get(name)
    return None if fn is None or mem is None else fn(mem, data)
