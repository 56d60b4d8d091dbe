"""The device uAPI tables against Linux 7.3's headers (docs/posted-series.md 5): numbers,
struct sizes, the ``min_size`` of each command and the two families' size rules."""

from __future__ import annotations

import errno
import struct

import pytest

from liveupdate.abi import devices_uapi as du
from liveupdate.errors import AbiError

# name: (number, sizeof, min size) -- iommufd.h's IOCTL_OP rows and vfio.h's minsz
LINUX = {
    "IOMMU_DESTROY": (0x3B80, 8, 8),
    "IOMMU_IOAS_ALLOC": (0x3B81, 12, 12),
    "IOMMU_IOAS_MAP": (0x3B85, 40, 40),
    "IOMMU_IOAS_UNMAP": (0x3B86, 24, 24),
    "IOMMU_HWPT_ALLOC": (0x3B89, 48, 24),
    "IOMMU_IOAS_MAP_FILE": (0x3B8F, 40, 40),
    "IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE": (0x3B95, 16, 16),
    "VFIO_DEVICE_GET_INFO": (0x3B6B, 24, 16),
    "VFIO_DEVICE_GET_REGION_INFO": (0x3B6C, 32, 32),
    "VFIO_DEVICE_RESET": (0x3B6F, 0, 0),
    "VFIO_DEVICE_BIND_IOMMUFD": (0x3B76, 24, 16),
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": (0x3B77, 16, 12),
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": (0x3B78, 12, 8),
}


@pytest.mark.parametrize("name", sorted(LINUX))
def test_numbers_and_sizes(name: str) -> None:
    c = du.cmd(name)
    assert (c.number, c.size, c.min_size) == LINUX[name]
    assert du.entry_for(c.number) is c


def test_map_file_golden_bytes() -> None:
    raw = du.cmd("IOMMU_IOAS_MAP_FILE").pack(flags=7, ioas_id=1, fd=5, start=0x1000,
                                             length=0x200000, iova=0x40000000)
    assert raw == struct.pack("<IIIiQQQ", 40, 7, 1, 5, 0x1000, 0x200000, 0x40000000)
    assert du.cmd("IOMMU_IOAS_MAP_FILE").fd_in == ("fd",)
    assert du.cmd("VFIO_DEVICE_BIND_IOMMUFD").fd_in == ("iommufd",)


def test_iommufd_size_rules() -> None:
    alloc = du.cmd("IOMMU_IOAS_ALLOC")
    with pytest.raises(AbiError) as e:
        du.lookup(du.IOMMUFD, alloc.number, struct.pack("<II", 8, 0))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(AbiError) as e:
        du.lookup(du.IOMMUFD, alloc.number, struct.pack("<IIII", 16, 0, 0, 1))
    assert e.value.errno == errno.E2BIG
    with pytest.raises(AbiError) as e:
        du.lookup(du.IOMMUFD, 0x3B84, bytes(8))
    assert e.value.errno == errno.ENOTTY
    _, a = du.lookup(du.IOMMUFD, du.cmd("IOMMU_HWPT_ALLOC").number,
                     struct.pack("<6I", 24, 0, 2, 1, 0, 0))  # before fault_id existed
    assert a["dev_id"] == 2 and a["fault_id"] == 0


def test_vfio_size_rules() -> None:
    bind = du.cmd("VFIO_DEVICE_BIND_IOMMUFD")
    with pytest.raises(AbiError) as e:
        du.vfio_args(bind, struct.pack("<III", 12, 0, 3))
    assert e.value.errno == errno.EINVAL
    a = du.vfio_args(bind, struct.pack("<IIiI", 16, 0, 3, 0))  # argsz without the token
    assert a["iommufd"] == 3 and a["token_uuid_ptr"] == 0
    assert du.reply(bind, struct.pack("<IIiI", 16, 0, 3, 0), out_devid=7,
                    token_uuid_ptr=1)[12:] == struct.pack("<I", 7)
