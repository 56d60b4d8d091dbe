"""hugetlb live update formats, after Pratyush Yadav's RFC ``[RFC PATCH 00/10] liveupdate:
hugetlb support`` (``<20251206230222.853493-1-pratyush@kernel.org>``; 06/10 the FLB, 10/10 the
file handler; header ``include/linux/kho/abi/hugetlb.h``; docs/posted-series.md 4).

* FLB ``hugetlb-v1``: ``struct hugetlb_ser`` (37 bytes, packed) =
  ``struct hugetlb_hstate_ser { u64 nr_pages; u8 order; } hstates[4]`` (9 bytes each, so the
  u64s are unaligned) then ``u8 nr_hstates``. Counts only: the pools are not preserved.
* File ``huge-memfd-v1``: ``struct hugemfd_ser`` (41 bytes, packed) =
  ``{u64 size, pos, nr_folios; struct kho_vmalloc folios; u8 order}``; the folio array holds
  ``struct hugemfd_folio_ser`` (16 bytes) ``{u64 pfn:52, reserved:12; u64 index}`` with
  ``index`` in base-page (4 KiB) units (the retrieve side shifts it by ``order``).

Decoders check what the RFC's retrieve relies on and what would corrupt memory: the hstate
count (at most :data:`MAX_HSTATES`), orders a huge page can have, reserved bits 0, folio
indexes aligned to the file's huge page and inside ``size``, no two folios at one index.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from liveupdate.abi.arrays import has_repeats
from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.abi.vmalloc import DESC_SIZE, KhoVmalloc
from liveupdate.errors import AbiError

FLB_COMPATIBLE = "hugetlb-v1"
COMPATIBLE = "huge-memfd-v1"
MAX_HSTATES = 4  # HUGETLB_SER_MAX_HSTATES
HSTATE = struct.Struct("<QB")  # hugetlb_hstate_ser, 9 bytes
FLB_SIZE = HSTATE.size * MAX_HSTATES + 1  # 37
SER = struct.Struct("<QQQ")
SER_SIZE = SER.size + DESC_SIZE + 1  # 41
PFN_BITS = 52
PFN_MASK = (1 << PFN_BITS) - 1
FOLIO_DTYPE = np.dtype([("pfn", "<u8"), ("index", "<u8")])
MIN_ORDER, MAX_ORDER = 1, 36  # a huge page is at least two pages; MAX_MAP_ORDER bounds it


@dataclass(frozen=True)
class HugetlbSer:
    """``struct hugetlb_ser``: (order, nr_pages) per hstate, in the kernel's hstate order."""

    hstates: tuple[tuple[int, int], ...]


def encode_flb(ser: HugetlbSer) -> bytes:
    if len(ser.hstates) > MAX_HSTATES:
        raise AbiError(msg=f"{FLB_COMPATIBLE}: {len(ser.hstates)} hstates > {MAX_HSTATES}")
    out = bytearray(FLB_SIZE)
    for i, (order, nr) in enumerate(ser.hstates):
        if not (0 <= nr < 1 << 64 and MIN_ORDER <= order <= MAX_ORDER):
            raise AbiError(msg=f"{FLB_COMPATIBLE}: hstate {i} (order {order}, {nr} pages)")
        HSTATE.pack_into(out, HSTATE.size * i, nr, order)
    out[-1] = len(ser.hstates)
    return bytes(out)


def decode_flb(raw: bytes) -> HugetlbSer:
    """The first 37 bytes of the FLB's page."""
    if len(raw) < FLB_SIZE:
        raise AbiError(msg=f"{FLB_COMPATIBLE}: {len(raw)} bytes, the struct is {FLB_SIZE}")
    n = raw[FLB_SIZE - 1]
    if n > MAX_HSTATES:
        raise AbiError(msg=f"{FLB_COMPATIBLE}: nr_hstates {n} > {MAX_HSTATES}")
    hs = []
    for i in range(n):
        nr, order = HSTATE.unpack_from(raw, HSTATE.size * i)
        if not MIN_ORDER <= order <= MAX_ORDER:
            raise AbiError(msg=f"{FLB_COMPATIBLE}: hstate {i} has order {order}")
        hs.append((order, nr))
    if len({o for o, _ in hs}) != n:
        raise AbiError(msg=f"{FLB_COMPATIBLE}: two hstates of one order")
    return HugetlbSer(tuple(hs))


@dataclass(frozen=True)
class HugeMemfdSer:
    """``struct hugemfd_ser``."""

    size: int
    pos: int
    nr_folios: int
    folios: KhoVmalloc
    order: int


def encode_ser(s: HugeMemfdSer) -> bytes:
    for name, v in (("size", s.size), ("pos", s.pos), ("nr_folios", s.nr_folios)):
        if not 0 <= v < 1 << 64:
            raise AbiError(msg=f"{COMPATIBLE}: {name} {v} does not fit in 64 bits")
    if not MIN_ORDER <= s.order <= MAX_ORDER:
        raise AbiError(msg=f"{COMPATIBLE}: order {s.order}")
    return SER.pack(s.size, s.pos, s.nr_folios) + s.folios.encode() + bytes([s.order])


def decode_ser(raw: bytes) -> HugeMemfdSer:
    """The first 41 bytes of the preserved allocation."""
    if len(raw) < SER_SIZE:
        raise AbiError(msg=f"{COMPATIBLE}: {len(raw)} bytes, the struct is {SER_SIZE}")
    size, pos, nr = SER.unpack_from(raw)
    desc = KhoVmalloc.decode(raw[SER.size : SER.size + DESC_SIZE])
    order = raw[SER_SIZE - 1]
    if not MIN_ORDER <= order <= MAX_ORDER:
        raise AbiError(msg=f"{COMPATIBLE}: order {order}")
    if size % (1 << (order + PAGE_SHIFT)):
        raise AbiError(msg=f"{COMPATIBLE}: size {size:#x} is not a multiple of the page")
    if nr > size >> (order + PAGE_SHIFT):
        raise AbiError(msg=f"{COMPATIBLE}: {nr} folios do not fit {size:#x} bytes")
    if (nr == 0) != (desc.first == 0):
        raise AbiError(msg=f"{COMPATIBLE}: {nr} folios with folio array at {desc.first:#x}")
    return HugeMemfdSer(size, pos, nr, desc, order)


@dataclass(frozen=True)
class HugeFolios:
    pfn: np.ndarray  # uint64, head pages
    index: np.ndarray  # uint64, base-page offset in the file


def encode_folios(f: HugeFolios) -> bytes:
    if len(f.pfn) != len(f.index):
        raise AbiError(msg=f"{COMPATIBLE}: folio arrays differ in length")
    if len(f.pfn) and int(f.pfn.max()) > PFN_MASK:
        raise AbiError(msg=f"{COMPATIBLE}: a pfn exceeds 52 bits")
    arr = np.zeros(len(f.pfn), FOLIO_DTYPE)
    arr["pfn"], arr["index"] = f.pfn, f.index
    return arr.tobytes()


def decode_folios(raw: bytes, ser: HugeMemfdSer) -> HugeFolios:
    """The ``nr_folios`` entries of the restored vmalloc area, checked against ``ser``."""
    if ser.nr_folios * FOLIO_DTYPE.itemsize > len(raw):
        raise AbiError(msg=f"{COMPATIBLE}: {ser.nr_folios} folios do not fit {len(raw)} "
                       "bytes")
    arr = np.frombuffer(raw, FOLIO_DTYPE, count=ser.nr_folios)
    pfn, index = arr["pfn"], arr["index"]
    span = np.uint64(1 << ser.order)
    if np.any(pfn >> np.uint64(PFN_BITS)):
        raise AbiError(msg=f"{COMPATIBLE}: a folio has reserved bits set")
    if np.any(pfn == 0) or np.any(pfn % span):
        raise AbiError(msg=f"{COMPATIBLE}: a folio's pfn is 0 or not aligned to its order")
    if np.any(index % span) or np.any(index >= np.uint64(ser.size >> PAGE_SHIFT)):
        raise AbiError(msg=f"{COMPATIBLE}: a folio index is misaligned or past the end")
    if has_repeats(index) or has_repeats(pfn):
        raise AbiError(msg=f"{COMPATIBLE}: two folios share an index or a pfn")
    return HugeFolios(pfn.copy(), index.copy())
