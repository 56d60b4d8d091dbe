"""``iommufd-v1``: a preserved iommufd's serialized data, as the IOMMU live update series v5
posts it (``<20260921004834.2601285-1-skhawaja@google.com>``; layout from a source tree of
that period, header ``include/linux/kho/abi/iommufd.h``; docs/posted-series.md 3.7).

``struct iommufd_ser``: ``u64 nr_hwpts`` then ``nr_hwpts`` packed ``struct
iommufd_hwpt_ser`` of 24 bytes -- ``u64 domain_data`` (phys of the HWPT's
``iommu_domain_ser`` in the IOMMU FLB), ``u64 token`` (the user's ``hwpt_token``), ``u8
reclaimed`` (0 when written), 7 bytes of padding. No IOAS content: the mapping is the
preserved page table, the memory the memfds preserved beside it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError

COMPATIBLE = "iommufd-v1"
HEAD = struct.Struct("<Q")
HWPT = struct.Struct("<QQB7x")
MAX_HWPTS = (1 << 20) // HWPT.size  # kho_alloc_preserve's largest sane allocation here


@dataclass(frozen=True)
class Hwpt:
    domain_data: int
    token: int
    reclaimed: bool = False


def encode(hwpts: list[Hwpt]) -> bytes:
    return HEAD.pack(len(hwpts)) + b"".join(
        HWPT.pack(h.domain_data, h.token, int(h.reclaimed)) for h in hwpts)


def size(n: int) -> int:
    """Bytes of the allocation (``get_order`` of it is what KHO preserves)."""
    return -(-(HEAD.size + n * HWPT.size) // PAGE_SIZE) * PAGE_SIZE


def decode(raw: bytes) -> list[Hwpt]:
    if len(raw) < HEAD.size:
        raise AbiError(msg=f"{COMPATIBLE}: {len(raw)} bytes, no count")
    (n,) = HEAD.unpack_from(raw)
    if n > MAX_HWPTS or HEAD.size + n * HWPT.size > len(raw):
        raise AbiError(msg=f"{COMPATIBLE}: {n} HWPTs do not fit {len(raw)} bytes")
    out = []
    for i in range(n):
        data, token, reclaimed = HWPT.unpack_from(raw, HEAD.size + i * HWPT.size)
        if not data or data % 8:
            raise AbiError(msg=f"{COMPATIBLE}: HWPT {i}: domain_data {data:#x}")
        out.append(Hwpt(data, token, bool(reclaimed)))
    return out
