"""The device uAPI of Linux 7.3 the devices issue needs (docs/posted-series.md section 5):
``/dev/iommu`` (``include/uapi/linux/iommufd.h``) and the VFIO device cdev
(``include/uapi/linux/vfio.h``), as tables in the style of :mod:`liveupdate.abi.uapi`.

Both use ioctl type ``';'`` (0x3b) with ``_IO`` numbers (no size or direction bits), so they
never collide with LUO's 0xBA numbers: userspace needs no generation to translate their fd
fields. Every iommufd struct starts with ``u32 size`` and every VFIO struct with ``u32 argsz``
(named ``size`` here, the same four bytes). The size rules differ:

* iommufd (``iommufd_fops_ioctl``): a number outside the table is ENOTTY; ``size`` below the
  command's ``min_size`` (``offsetofend`` of its last mandatory field) is EINVAL; bytes past
  what the kernel knows must be zero (E2BIG, ``copy_struct_from_user``); a shorter struct is
  zero-extended (:func:`lookup`).
* VFIO (``vfio_device_fops_unl_ioctl`` and the commands): ``copy_from_user`` of ``minsz``
  bytes, ``argsz < minsz`` is EINVAL; a longer ``argsz`` is accepted and its tail ignored
  (:func:`vfio_args`).

``IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE`` (0x95) is the posted IOMMU series' (section 3.7),
not 7.3's: :data:`POSTED` says which entries only ``7.3+posted`` has.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Any

from liveupdate.abi import uapi
from liveupdate.abi.uapi import Ioctl, Target
from liveupdate.errors import AbiError

IOMMUFD_TYPE = 0x3B
VFIO_BASE = 100
# enum iommufd_ioas_map_flags
MAP_FIXED_IOVA, MAP_WRITEABLE, MAP_READABLE = 1, 2, 4
# HWPT_ALLOC flags and data types
HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_DIRTY_TRACKING = 1, 2
HWPT_FAULT_ID_VALID, HWPT_ALLOC_PASID = 4, 8
HWPT_DATA_NONE = 0
# VFIO
VFIO_DEVICE_BIND_FLAG_TOKEN = 1
VFIO_DEVICE_ATTACH_PASID = 1
VFIO_DEVICE_FLAGS_RESET, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_CAPS = 1, 2, 1 << 7
VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE = 1, 2
VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX = 0, 7
VFIO_PCI_NUM_REGIONS, VFIO_PCI_NUM_IRQS = 9, 5
VFIO_PCI_OFFSET_SHIFT = 40  # a region's file offset: index << 40


@dataclass(frozen=True)
class DevIoctl(Ioctl):
    """An ``_IO(';', nr)`` command; its first field (``size`` or ``argsz``) defaults to the
    struct's size when packed."""

    type_: int = IOMMUFD_TYPE

    @property
    def number(self) -> int:
        return self.type_ << 8 | self.nr

    def pack(self, **values: Any) -> bytes:
        if not self.fields:  # a command without an argument (VFIO_DEVICE_RESET)
            if values:
                raise AbiError(msg=f"{self.name} takes no argument")
            return b""
        values.setdefault(self.fields[0], self.size)
        return super().pack(**values)


D = Target.DEVICE  # the device node's own file
IOMMUFD = (
    DevIoctl("IOMMU_DESTROY", 0x80, D, "II", ("size", "id")),
    DevIoctl("IOMMU_IOAS_ALLOC", 0x81, D, "III", ("size", "flags", "out_ioas_id")),
    DevIoctl("IOMMU_IOAS_MAP", 0x85, D, "IIIIQQQ",
             ("size", "flags", "ioas_id", "reserved", "user_va", "length", "iova")),
    DevIoctl("IOMMU_IOAS_UNMAP", 0x86, D, "IIQQ", ("size", "ioas_id", "iova", "length")),
    DevIoctl("IOMMU_HWPT_ALLOC", 0x89, D, "IIIIIIIIQII",
             ("size", "flags", "dev_id", "pt_id", "out_hwpt_id", "reserved", "data_type",
              "data_len", "data_uptr", "fault_id", "reserved2"), min_end="reserved"),
    DevIoctl("IOMMU_IOAS_MAP_FILE", 0x8F, D, "IIIiQQQ",
             ("size", "flags", "ioas_id", "fd", "start", "length", "iova"), fd_in=("fd",)),
)
# posted, not 7.3 (docs/posted-series.md 3.7)
MARK_PRESERVE = DevIoctl("IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE", 0x95, D, "IIQ",
                         ("size", "hwpt_id", "hwpt_token"))
VFIO = (
    DevIoctl("VFIO_DEVICE_GET_INFO", VFIO_BASE + 7, D, "IIIIII",
             ("size", "flags", "num_regions", "num_irqs", "cap_offset", "pad"),
             min_end="num_irqs"),
    DevIoctl("VFIO_DEVICE_GET_REGION_INFO", VFIO_BASE + 8, D, "IIIIQQ",
             ("size", "flags", "index", "cap_offset", "region_size", "offset")),
    DevIoctl("VFIO_DEVICE_RESET", VFIO_BASE + 11, D, "", ()),
    DevIoctl("VFIO_DEVICE_BIND_IOMMUFD", VFIO_BASE + 18, D, "IIiIQ",
             ("size", "flags", "iommufd", "out_devid", "token_uuid_ptr"),
             fd_in=("iommufd",), min_end="out_devid"),
    DevIoctl("VFIO_DEVICE_ATTACH_IOMMUFD_PT", VFIO_BASE + 19, D, "IIII",
             ("size", "flags", "pt_id", "pasid"), min_end="pt_id"),
    DevIoctl("VFIO_DEVICE_DETACH_IOMMUFD_PT", VFIO_BASE + 20, D, "III",
             ("size", "flags", "pasid"), min_end="flags"),
)
ALL = (*IOMMUFD, MARK_PRESERVE, *VFIO)
POSTED = frozenset({MARK_PRESERVE.name})
BY_NAME = {i.name: i for i in ALL}


def cmd(name: str) -> DevIoctl:
    try:
        return BY_NAME[name]
    except KeyError:
        raise AbiError(msg=f"no device ioctl {name}", err=errno.ENOTTY) from None


def entry_for(number: int) -> DevIoctl | None:
    """The entry whose number is exactly ``number`` (userspace fd translation)."""
    return next((i for i in ALL if i.number == number), None)


def lookup(table: tuple[DevIoctl, ...], number: int, arg: bytes
           ) -> tuple[DevIoctl, dict[str, Any]]:
    """``iommufd_fops_ioctl``: the command of ``number`` in ``table`` (ENOTTY), the size
    rules, the decoded kernel-sized struct."""
    entry = next((i for i in table if i.number == number), None)
    if entry is None:
        raise AbiError(msg=f"ioctl {number:#x} is not an iommufd command", err=errno.ENOTTY)
    if len(arg) < 4:
        raise AbiError(msg="ioctl argument too short to hold its size", err=errno.EFAULT)
    (size,) = struct.unpack_from("<I", arg)
    if size > len(arg):
        raise AbiError(msg=f"size {size} exceeds the {len(arg)}-byte buffer", err=errno.EFAULT)
    data = uapi.copy_struct_from_user(entry.size, entry.min_size, arg[:size])
    return entry, entry.unpack(data)


def vfio_args(entry: DevIoctl, arg: bytes) -> dict[str, Any]:
    """A VFIO command's ``copy_from_user(minsz)`` then ``argsz < minsz``: EINVAL; the fields
    read as the user wrote them (0 where ``argsz`` or the bytes passed stop short)."""
    if len(arg) < 4:
        raise AbiError(msg=f"{entry.name}: no argsz", err=errno.EFAULT)
    (argsz,) = struct.unpack_from("<I", arg)
    if argsz < entry.min_size:
        raise AbiError(msg=f"{entry.name}: argsz {argsz} < {entry.min_size}")
    return {f: entry.field(arg[: min(argsz, len(arg))], f) for f in entry.fields}


def reply(entry: DevIoctl, arg: bytes, **out: int) -> bytes:
    """The user's bytes with the ``out`` fields written back (``copy_to_user`` of each),
    never longer than what the user passed."""
    buf = bytearray(arg)
    for name, value in out.items():
        if entry.field_end(name) <= len(buf):
            entry.set_field(buf, name, value)
    return bytes(buf)
