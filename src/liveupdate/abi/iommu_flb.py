"""The IOMMU FLB ``"iommu-liveupdate"``: the IOMMU units, page tables and devices a live
update keeps translating, as the IOMMU live update series v5 posts it
(``<20260921004834.2601285-1-skhawaja@google.com>``; layout from a source tree of that
period, header ``include/linux/kho/abi/iommu.h``, the VT-d members only;
docs/posted-series.md 3.1-3.5).

``struct iommu_flb_ser`` (32 bytes): ``u64 version`` (:data:`VERSION`) and the first page of
three lists -- units, domains, devices. Each list is a chain of one-page arrays: ``u64
next_array_phys``, ``u64 nr_objects`` (allocated, deleted ones included), then the objects,
each opening with ``u32 ref_count``, ``u32 flags`` (bit 0 deleted, bit 1 incoming). Objects:
a domain (40 bytes: top table, its level, address size, sign extension, a pointer the next
kernel fills), a device (72: requester id, segment, DMA owner token, domain id on its unit,
its domain's and its unit's object addresses, the VT-d PASID table), a unit (112: the token
-- the register base --, its type, and the VT-d part: the root table and a 512-bit bitmap of
preserved context tables, bit ``bus * 2 + (devfn >> 7)``). The next kernel panics when the
version differs or a list head is 0 (:func:`decode` says EINVAL).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

COMPATIBLE = "iommu-liveupdate"
VERSION = 1
FLB = struct.Struct("<QQQQ")
ARRAY = struct.Struct("<QQ")
HDR = struct.Struct("<II")
DOMAIN = struct.Struct("<IIQQIB3xQ")  # hdr, top_table_phys, top_level, vasz, sign_extend, ptr
DEVICE = struct.Struct("<IIIIQQQQB7xQQ")  # hdr, devid, segment, token, did, domain, unit, vtd
UNIT = struct.Struct("<IIQQB7xQQ8Q")  # hdr, token, type, vtd: restored, base, root, bitmap
FLAG_DELETED, FLAG_INCOMING = 1, 2
TYPE_INTEL = 1
MAX_ARRAY_PAGES = 1024


@dataclass(frozen=True)
class Domain:
    phys: int  # where the object sits (devices point at it)
    top_table: int
    top_level: int
    vasz: int
    sign_extend: bool


@dataclass(frozen=True)
class Device:
    devid: int  # bus << 8 | devfn
    segment: int
    dma_owner_token: int
    did: int  # the domain id on its unit
    domain: int  # phys of its Domain object
    unit: int  # phys of its Unit object
    pasid_table: int
    max_pasid: int


@dataclass(frozen=True)
class Unit:
    phys: int
    token: int  # VT-d: the register base
    type: int
    root_table: int
    context_tables: frozenset[int]  # bitmap bits set: bus * 2 + (devfn >> 7)


@dataclass(frozen=True)
class IommuFlb:
    units: list[Unit]
    domains: list[Domain]
    devices: list[Device]


def _objects(mem: PhysMem, first: int, size: int, what: str) -> Iterator[tuple[int, bytes]]:
    """(phys, bytes) of every live object of one list."""
    per = (PAGE_SIZE - ARRAY.size) // size
    for page, raw in mem.chain(first, MAX_ARRAY_PAGES, f"IOMMU FLB {what}"):
        _, n = ARRAY.unpack_from(raw)
        if n > per:
            raise AbiError(msg=f"IOMMU FLB {what} array {page:#x}: {n} objects, {per} fit")
        for i in range(n):
            off = ARRAY.size + i * size
            _, flags = HDR.unpack_from(raw, off)
            if not flags & FLAG_DELETED:
                yield page + off, raw[off : off + size]


def decode(mem: PhysMem, flb: int) -> IommuFlb:
    version, units, domains, devices = FLB.unpack(mem.read(flb, FLB.size, "IOMMU FLB"))
    if version != VERSION:
        raise AbiError(err=errno.EINVAL, msg=f"IOMMU FLB: version {version}, not {VERSION}")
    if not (units and domains and devices):
        raise AbiError(err=errno.EINVAL, msg="IOMMU FLB: a list has no first page")
    out_units = []
    for phys, raw in _objects(mem, units, UNIT.size, "units"):
        _, _, token, kind, _, _base, root, *bitmap = UNIT.unpack(raw)
        bits = frozenset(w * 64 + b for w, word in enumerate(bitmap) for b in range(64)
                         if word >> b & 1)
        out_units.append(Unit(phys, token, kind, root, bits))
    out_domains = [Domain(phys, top, level, vasz, bool(sx)) for phys, raw in
                   _objects(mem, domains, DOMAIN.size, "domains")
                   for _, _, top, level, vasz, sx, _ in [DOMAIN.unpack(raw)]]
    known_domains = {d.phys for d in out_domains}
    known_units = {u.phys for u in out_units}
    out_devices = []
    for _, raw in _objects(mem, devices, DEVICE.size, "devices"):
        _, _, devid, seg, token, did, dom, unit, _, pasid, max_pasid = DEVICE.unpack(raw)
        if dom not in known_domains or unit not in known_units:
            raise AbiError(err=errno.EINVAL, msg=f"IOMMU FLB: device {devid:#06x} points at "
                           f"domain {dom:#x} / unit {unit:#x}, which the FLB does not hold")
        out_devices.append(Device(devid, seg, token, did, dom, unit, pasid, max_pasid))
    return IommuFlb(out_units, out_domains, out_devices)


def encode_unit(token: int, root_table: int, context_tables: set[int], refs: int = 1) -> bytes:
    bitmap = [0] * 8
    for bit in context_tables:
        if not 0 <= bit < 512:
            raise AbiError(msg=f"IOMMU FLB: context table bit {bit} outside 0..511")
        bitmap[bit // 64] |= 1 << (bit % 64)
    return UNIT.pack(refs, 0, token, TYPE_INTEL, 0, token, root_table, *bitmap)


def encode_domain(top_table: int, top_level: int, vasz: int = 48) -> bytes:
    return DOMAIN.pack(1, 0, top_table, top_level, vasz, 0, 0)


def encode_device(devid: int, did: int, domain: int, unit: int, token: int = 0,
                  segment: int = 0) -> bytes:
    return DEVICE.pack(1, 0, devid, segment, token, did, domain, unit, 0, 0, 0)


def encode_array(objects: list[bytes], next_page: int = 0) -> bytes:
    """One array page holding ``objects`` (all of one list's size)."""
    return (ARRAY.pack(next_page, len(objects)) + b"".join(objects)).ljust(PAGE_SIZE, b"\0")


def encode_flb(units: int, domains: int, devices: int) -> bytes:
    return FLB.pack(VERSION, units, domains, devices)
