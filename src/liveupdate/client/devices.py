"""``/dev/iommu`` and a VFIO device cdev as objects, over the same
:class:`~liveupdate.client.backends.Backend` as ``/dev/liveupdate`` (invariant 4): the uAPI
struct bytes of :mod:`liveupdate.abi.devices_uapi`, on a real kernel (``fcntl.ioctl``) and on
the emulated one alike. Every failure is a :class:`~liveupdate.errors.LiveUpdateError` with
the kernel's errno.

What a VMM does to assign a device (docs/posted-series.md 6)::

    iommufd = Iommufd(backend)
    ioas = iommufd.ioas_alloc()
    iommufd.map_file(ioas, memfd, 0, size, iova=0)   # IOVA = guest physical
    dev = VfioDevice(backend, "/dev/vfio/devices/vfio0")
    dev_id = dev.bind(iommufd.fd)
    hwpt = iommufd.hwpt_alloc(dev_id, ioas)           # or dev.attach(ioas): an auto domain
    dev.attach(hwpt)
"""

from __future__ import annotations

import os
from typing import Any

from liveupdate.abi import devices_uapi as du
from liveupdate.client.backends import Backend, open_backend

DEV_IOMMU = "/dev/iommu"
RW = du.MAP_READABLE | du.MAP_WRITEABLE


def ioctl(backend: Backend, fd: int, name: str, /, **fields: Any) -> dict[str, Any]:
    """One device ioctl by name: packed, sent, the reply unpacked."""
    entry = du.cmd(name)
    buf = bytearray(entry.pack(**fields))
    backend.ioctl(fd, entry.number, buf)
    return entry.unpack(bytes(buf))


class _Fd:
    """An open device file: opened by path, or an fd the caller holds (one retrieved from a
    LUO session), which the object then owns."""

    def __init__(self, backend: Backend | None, path: str, fd: int | None = None) -> None:
        self.backend = backend or open_backend()
        self.path = path
        self.fd = self.backend.open(path) if fd is None else fd

    def _io(self, name: str, /, **fields: Any) -> dict[str, Any]:
        return ioctl(self.backend, self.fd, name, **fields)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Iommufd(_Fd):
    def __init__(self, backend: Backend | None = None, path: str = DEV_IOMMU,
                 fd: int | None = None) -> None:
        super().__init__(backend, path, fd)

    def ioas_alloc(self) -> int:
        return int(self._io("IOMMU_IOAS_ALLOC")["out_ioas_id"])

    def map_file(self, ioas: int, fd: int, start: int, length: int, iova: int | None = None,
                 flags: int = RW) -> int:
        """``IOMMU_IOAS_MAP_FILE`` of ``length`` bytes of memfd ``fd`` from ``start``; at
        ``iova`` (FIXED_IOVA) or where the kernel chooses. Returns the IOVA."""
        if iova is not None:
            flags |= du.MAP_FIXED_IOVA
        out = self._io("IOMMU_IOAS_MAP_FILE", flags=flags, ioas_id=ioas, fd=fd, start=start,
                       length=length, iova=iova or 0)
        return int(out["iova"])

    def unmap(self, ioas: int, iova: int, length: int) -> int:
        return int(self._io("IOMMU_IOAS_UNMAP", ioas_id=ioas, iova=iova,
                            length=length)["length"])

    def hwpt_alloc(self, dev_id: int, pt_id: int) -> int:
        return int(self._io("IOMMU_HWPT_ALLOC", dev_id=dev_id, pt_id=pt_id)["out_hwpt_id"])

    def destroy(self, id_: int) -> None:
        self._io("IOMMU_DESTROY", id=id_)

    def mark_preserve(self, hwpt: int, token: int) -> None:
        """``IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE`` (the posted IOMMU series; ENOTTY on a
        kernel without it)."""
        self._io("IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE", hwpt_id=hwpt, hwpt_token=token)


class VfioDevice(_Fd):
    """A VFIO device cdev (``/dev/vfio/devices/vfioN``) or a retrieved device file."""

    def __init__(self, backend: Backend | None = None, path: str = "",
                 fd: int | None = None) -> None:
        super().__init__(backend, path, fd)

    def bind(self, iommufd: int) -> int:
        return int(self._io("VFIO_DEVICE_BIND_IOMMUFD", iommufd=iommufd)["out_devid"])

    def attach(self, pt_id: int) -> int:
        return int(self._io("VFIO_DEVICE_ATTACH_IOMMUFD_PT", pt_id=pt_id)["pt_id"])

    def detach(self) -> None:
        self._io("VFIO_DEVICE_DETACH_IOMMUFD_PT")

    def info(self) -> dict[str, Any]:
        return self._io("VFIO_DEVICE_GET_INFO")

    def region_info(self, index: int) -> dict[str, Any]:
        return self._io("VFIO_DEVICE_GET_REGION_INFO", index=index)

    def reset(self) -> None:
        self._io("VFIO_DEVICE_RESET")

    def read(self, index: int, offset: int, count: int) -> bytes:
        return self.backend.pread(self.fd, count, index << du.VFIO_PCI_OFFSET_SHIFT | offset)

    def write(self, index: int, offset: int, data: bytes) -> int:
        return self.backend.pwrite(self.fd, data, index << du.VFIO_PCI_OFFSET_SHIFT | offset)

    def config_read(self, offset: int, size: int) -> int:
        raw = self.read(du.VFIO_PCI_CONFIG_REGION_INDEX, offset, size)
        return int.from_bytes(raw, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.write(du.VFIO_PCI_CONFIG_REGION_INDEX, offset, value.to_bytes(size, "little"))

    def bar_read(self, offset: int) -> int:
        return int.from_bytes(self.read(du.VFIO_PCI_BAR0_REGION_INDEX, offset, 4), "little")

    def bar_write(self, offset: int, value: int) -> None:
        self.write(du.VFIO_PCI_BAR0_REGION_INDEX, offset, value.to_bytes(4, "little"))
