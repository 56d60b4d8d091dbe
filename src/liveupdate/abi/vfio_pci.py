"""``vfio-pci-v1``: a preserved VFIO PCI device file's serialized data, as the VFIO live
update series v5 posts it (``<20260714151505.3466855-7-vipinsh@google.com>``, 06/20; header
``include/linux/kho/abi/vfio_pci.h``; docs/posted-series.md 1.1).

``struct vfio_pci_core_device_ser`` is 6 packed bytes, ``u32 domain`` (the PCI segment) then
``u16 bdf`` (``bus << 8 | devfn``), in an order-0 page from ``kho_alloc_preserve``; v4 and
earlier had ``{u16 bdf; u16 domain}``. No magic or version: the ``-v1`` of the compatible.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from liveupdate.errors import AbiError

COMPATIBLE = "vfio-pci-v1"
SER = struct.Struct("<IH")


@dataclass(frozen=True)
class VfioPciSer:
    domain: int
    bdf: int

    def __str__(self) -> str:
        return (f"{self.domain:04x}:{self.bdf >> 8:02x}:{(self.bdf >> 3) & 31:02x}."
                f"{self.bdf & 7}")


def encode(ser: VfioPciSer) -> bytes:
    return SER.pack(ser.domain, ser.bdf)


def decode(raw: bytes) -> VfioPciSer:
    """The first 6 bytes of the preserved allocation (the rest of its page is not read)."""
    if len(raw) < SER.size:
        raise AbiError(msg=f"{COMPATIBLE}: {len(raw)} bytes, the struct is {SER.size}")
    return VfioPciSer(*SER.unpack_from(raw))
