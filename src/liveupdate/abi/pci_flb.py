"""The PCI core's FLB ``"pci"``: which PCI devices a live update keeps, as the PCI live update
series v9 posts it (``<20260918200640.887030-1-dmatlack@google.com>``; layout from the
stored v8 tree, header ``include/linux/kho/abi/pci.h``; docs/posted-series.md 2).

``struct pci_ser`` (16 bytes, an order-0 ``kho_alloc_preserve`` page, the FLB's data):
``u32 version`` (:data:`VERSION`, 2 since "Auto-preserve upstream bridges"), ``u32
nr_devices`` (live entries, endpoints and bridges), ``u64 devices`` (the first block of a KHO
block set, 0 when none was ever added). Entries ``struct pci_dev_ser`` (8 bytes, 510 per
block): ``u32 domain``, ``u16 bdf``, ``u16 refcount`` (0: a free slot). The next kernel's
retrieve refuses another version with EINVAL -- which the PCI core turns into a panic -- and
an entry indexed twice with EBUSY (``pci_liveupdate_flb_retrieve``).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass

from liveupdate.abi import kho_block
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

COMPATIBLE = "pci"
VERSION = 2
SER = struct.Struct("<IIQ")
DEV = struct.Struct("<IHH")


@dataclass(frozen=True)
class PciDev:
    domain: int
    bdf: int
    refcount: int


@dataclass(frozen=True)
class PciSer:
    version: int
    nr_devices: int
    devices: int  # phys of the first block


def encode_ser(ser: PciSer) -> bytes:
    return SER.pack(ser.version, ser.nr_devices, ser.devices)


def decode_ser(raw: bytes) -> PciSer:
    if len(raw) < SER.size:
        raise AbiError(msg=f"pci FLB: {len(raw)} bytes, struct pci_ser is {SER.size}")
    ser = PciSer(*SER.unpack_from(raw))
    if ser.version != VERSION:
        raise AbiError(err=errno.EINVAL, msg=f"pci FLB: version {ser.version}, this kernel "
                       f"reads {VERSION}")
    return ser


def encode_devices(devs: list[PciDev], alloc: Callable[[], int]) -> tuple[int, dict[int, bytes]]:
    """The entries as a KHO block set: (first block, {block phys: page})."""
    return kho_block.encode(b"".join(DEV.pack(d.domain, d.bdf, d.refcount) for d in devs),
                            DEV.size, alloc)


def decode_devices(mem: PhysMem, ser: PciSer) -> list[PciDev]:
    """The live entries (refcount != 0), in block order; EBUSY for a device listed twice,
    EINVAL when their number is not ``nr_devices``."""
    if not ser.devices:
        devs: list[PciDev] = []
    else:
        raw, _ = kho_block.decode(mem, ser.devices, DEV.size, "pci FLB devices")
        devs = [PciDev(*DEV.unpack_from(raw, o)) for o in range(0, len(raw), DEV.size)]
    live = [d for d in devs if d.refcount]
    keys = [(d.domain << 16) | d.bdf for d in live]
    if len(set(keys)) != len(keys):
        raise AbiError(err=errno.EBUSY, msg="pci FLB: a device is listed twice")
    if len(live) != ser.nr_devices:
        raise AbiError(err=errno.EINVAL, msg=f"pci FLB: nr_devices {ser.nr_devices}, "
                       f"{len(live)} live entries")
    return live
