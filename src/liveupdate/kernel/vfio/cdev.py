"""The VFIO device cdev's file (``vfio_device_fops``) and its ioctls, as an ops table in the
style of the LUO uAPI: bind to an iommufd, attach and detach a page table, device and region
info, reset; ``pread``/``pwrite`` reach the regions (:mod:`liveupdate.kernel.vfio.pci` says
which, and the deviations). Size rules: each command's ``minsz`` (``argsz`` below it is
EINVAL, a longer one is accepted), :func:`liveupdate.abi.devices_uapi.vfio_args`; an unknown
number is ENOTTY once bound (EINVAL before, as ``access_granted`` is checked first)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from liveupdate.abi import devices_uapi as du
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.iommufd.fops import IommufdOps
from liveupdate.kernel.iommufd.objects import Hwpt, Ictx, Idev, Ioas
from liveupdate.kernel.vfio.pci import VfioPciDevice, continuous

Resolve = Callable[[int], File]


@dataclass(eq=False)
class DeviceFile:
    """``struct vfio_device_file``: the device, and once bound its iommufd and device."""

    dev: VfioPciDevice
    retrieved: bool = False  # made by LUO retrieve (the device may be running)
    frozen: bool = False  # the live update froze it: every use is EIO (VFIO v5)
    iommufd: File | None = None
    idev: Idev | None = None

    @property
    def ictx(self) -> Ictx:
        assert self.iommufd is not None
        ctx: Ictx = self.iommufd.private
        return ctx

    def need_bound(self, what: str) -> None:
        if self.frozen:
            raise LiveUpdateError(err=errno.EIO, msg=f"{what}: the device is frozen for a "
                                  "live update")
        if self.idev is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"{what}: the device is not bound "
                                  "to an iommufd (VFIO_DEVICE_BIND_IOMMUFD)")


def _bind(df: DeviceFile, arg: bytes, fds: list[int], resolve: Resolve) -> bytes:
    entry = du.cmd("VFIO_DEVICE_BIND_IOMMUFD")
    if df.frozen:
        raise LiveUpdateError(err=errno.EIO, msg="BIND_IOMMUFD: the device is frozen")
    a = du.vfio_args(entry, arg)
    if a["flags"] & ~du.VFIO_DEVICE_BIND_FLAG_TOKEN:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"BIND_IOMMUFD: flags {a['flags']:#x}")
    if a["flags"]:
        raise LiveUpdateError(err=errno.EINVAL, msg="BIND_IOMMUFD: a VF token for a "
                              "function that is no VF")
    if df.idev is not None or df.dev.open:
        raise LiveUpdateError(err=errno.EINVAL, msg="BIND_IOMMUFD: the device is bound "
                              "already")
    if not fds:
        raise LiveUpdateError(err=errno.EBADF, msg=f"BIND_IOMMUFD: fd {a['iommufd']} is not "
                              "open")
    f = resolve(fds[0])
    if not isinstance(f.ops, IommufdOps):
        raise LiveUpdateError(err=errno.EBADFD, msg="BIND_IOMMUFD: not an iommufd")
    if df.retrieved and df.dev.incoming and continuous(df.dev.k):
        pass  # continuous live update (deviation): the running device is not reset
    else:
        df.dev.enable()
        if df.retrieved:  # as posted, or a device the PCI core did not mark incoming
            df.dev.k.printk(f"vfio-pci {df.dev.name}: reset at bind (vfio_pci_core_enable"
                            f"{'' if df.dev.incoming else ', not incoming'})")
    df.iommufd = f.get()
    idev = df.ictx.new_idev(df.dev.bdf)
    df.idev, df.dev.open = idev, True
    return du.reply(entry, arg, out_devid=idev.id)


def _attach(df: DeviceFile, arg: bytes, fds: list[int], resolve: Resolve) -> bytes:
    """``vfio_df_ioctl_attach_pt``: ``pt_id`` an IOAS (its auto domain, made on first use)
    or a paging HWPT of this iommufd; the attached HWPT's ID is written back."""
    entry = du.cmd("VFIO_DEVICE_ATTACH_IOMMUFD_PT")
    a = du.vfio_args(entry, arg)
    if a["flags"] & ~du.VFIO_DEVICE_ATTACH_PASID:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"ATTACH: flags {a['flags']:#x}")
    if a["flags"]:
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="ATTACH: no PASID support")
    assert df.idev is not None
    ctx, pt = df.ictx, df.ictx.objects.get(a["pt_id"])
    if isinstance(pt, Ioas):
        hwpt = next((h for h in pt.hwpts if h.auto), None) or ctx.hwpt_alloc(pt, auto=True)
    elif isinstance(pt, Hwpt):
        hwpt = pt
    else:
        raise LiveUpdateError(err=errno.ENOENT if pt is None else errno.EINVAL,
                              msg=f"ATTACH: {a['pt_id']} is no IOAS or HWPT")
    try:
        ctx.attach(df.idev, hwpt)
    except LiveUpdateError:
        if hwpt.auto and not hwpt.devices:
            ctx.hwpt_free(hwpt)
        raise
    return du.reply(entry, arg, pt_id=hwpt.id)


def _detach(df: DeviceFile, arg: bytes, fds: list[int], resolve: Resolve) -> bytes:
    a = du.vfio_args(du.cmd("VFIO_DEVICE_DETACH_IOMMUFD_PT"), arg)
    if a["flags"]:
        raise LiveUpdateError(err=errno.EINVAL, msg="DETACH: flags must be 0 (no PASID)")
    assert df.idev is not None
    df.ictx.detach(df.idev)
    return arg


def _info(df: DeviceFile, arg: bytes, fds: list[int], resolve: Resolve) -> bytes:
    entry = du.cmd("VFIO_DEVICE_GET_INFO")
    du.vfio_args(entry, arg)
    return du.reply(entry, arg, flags=du.VFIO_DEVICE_FLAGS_RESET | du.VFIO_DEVICE_FLAGS_PCI,
                    num_regions=du.VFIO_PCI_NUM_REGIONS, num_irqs=du.VFIO_PCI_NUM_IRQS)


def _region_info(df: DeviceFile, arg: bytes, fds: list[int], resolve: Resolve) -> bytes:
    entry = du.cmd("VFIO_DEVICE_GET_REGION_INFO")
    a = du.vfio_args(entry, arg)
    index = a["index"]
    if index >= du.VFIO_PCI_NUM_REGIONS:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"REGION_INFO: no region {index}")
    size = {du.VFIO_PCI_BAR0_REGION_INDEX: df.dev.bar_size,
            du.VFIO_PCI_CONFIG_REGION_INDEX: 256}.get(index, 0)
    rw = du.VFIO_REGION_INFO_FLAG_READ | du.VFIO_REGION_INFO_FLAG_WRITE
    return du.reply(entry, arg, flags=rw if size else 0, cap_offset=0, region_size=size,
                    offset=index << du.VFIO_PCI_OFFSET_SHIFT)


def _reset(df: DeviceFile, arg: bytes, fds: list[int], resolve: Resolve) -> bytes:
    df.dev.reset()
    return b""


IOCTLS: dict[str, Callable[[DeviceFile, bytes, list[int], Resolve], bytes]] = {
    "VFIO_DEVICE_GET_INFO": _info,
    "VFIO_DEVICE_GET_REGION_INFO": _region_info,
    "VFIO_DEVICE_RESET": _reset,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": _attach,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": _detach,
}


class VfioDeviceOps:
    name = "vfio-device"

    def release(self, f: File) -> None:
        """``vfio_device_fops_release`` -> ``vfio_df_close``: the device disabled first
        (``close_device``: bus mastering off, reset), then unbound (``vfio_df_iommufd_unbind``:
        detached, so no DMA is in flight when its context entry goes), the iommufd dropped."""
        df: DeviceFile = f.private
        if df.idev is None or df.iommufd is None:
            return
        df.dev.disable()
        ctx = df.ictx
        ctx.detach(df.idev)
        ctx.objects.pop(df.idev.id, None)
        df.idev, df.dev.open = None, False
        iommufd, df.iommufd = df.iommufd, None
        iommufd.put()

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Resolve) -> tuple[bytes, list[File]]:
        df: DeviceFile = f.private
        entry = du.entry_for(cmd)
        if entry is not None and entry.name == "VFIO_DEVICE_BIND_IOMMUFD":
            return _bind(df, arg, fds, resolve), []
        df.need_bound(f"ioctl {cmd:#x}")
        if entry is None or entry.name not in IOCTLS:
            raise LiveUpdateError(err=errno.ENOTTY, msg=f"ioctl {cmd:#x}: not a VFIO device "
                                  "command")
        return IOCTLS[entry.name](df, arg, fds, resolve), []

    def pread(self, f: File, count: int, offset: int) -> bytes:
        df: DeviceFile = f.private
        df.need_bound("read")
        return df.dev.region_rw(offset, None, count)

    def pwrite(self, f: File, data: bytes, offset: int) -> int:
        df: DeviceFile = f.private
        df.need_bound("write")
        df.dev.region_rw(offset, data, len(data))
        return len(data)


VFIO_DEVICE_OPS = VfioDeviceOps()


def open_device(dev: VfioPciDevice) -> File:
    """``vfio_device_fops_cdev_open``: a file not yet bound; EBUSY for a device a live
    update preserved until its session finishes (VFIO v5 11/20: only RETRIEVE_FD gets it)."""
    if dev.incoming:
        raise LiveUpdateError(err=errno.EBUSY, msg=f"{dev.path}: preserved by the previous "
                              "kernel; retrieve it from its LUO session")
    return File(VFIO_DEVICE_OPS, DeviceFile(dev))
