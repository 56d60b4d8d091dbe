"""memfd preservation formats of every generation (spec/luo.md 5.3, kho.md 3.4).

* **FDT ``memfd-v1``** (v2/v3/v4 postings): LUO ``data`` is the phys of a sequentially built
  FDT ``/ { pos = <u64>; size = <u64>; folios = <{u64 foliodesc; u64 index}[]>; }`` with
  ``foliodesc = pfn << 12 | flags``; entries whose ``foliodesc`` is 0 are skipped. Its buffer is
  ``PAGE_ALIGN(16 n) + PAGE_SIZE`` rounded to a power-of-two number of pages.
* **struct ``memfd-v1``** (6.19): packed 40 bytes ``{u64 pos, size, nr_folios; struct
  kho_vmalloc folios}``; each folio is 16 bytes ``{u64 pfn:52, flags:12; u64 index}``, so on
  little-endian the PFN is in bits 0-51 and the flags above it -- the opposite of the FDT era.
* **struct ``memfd-v2``** (7.1+): 48 bytes ``{u64 pos, size; u32 seals, flags (must be 0);
  u64 nr_folios; struct kho_vmalloc folios}``; ``seals`` must be within ``0x3F``.

Sources: the FDT-era property order (``pos``, ``size``, then the ``folios`` placeholder) is read
in the v2/v3 memfd patch; that ``memfd_luo_create_fdt`` is ``fdt_create`` + an empty
reservation map + root node ``""`` is inferred. The struct layouts are from
``include/linux/kho/abi/memfd.h`` as quoted in spec/luo.md 5.3.

Flags: bit 0 DIRTY, bit 1 UPTODATE; any other bit is refused on decode.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import numpy as np

from liveupdate.abi import fdt
from liveupdate.abi.arrays import has_repeats
from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE, get_order
from liveupdate.abi.vmalloc import DESC_SIZE, KhoVmalloc
from liveupdate.errors import AbiError

MEMFD_V1 = "memfd-v1"
MEMFD_V2 = "memfd-v2"
FOLIO_DIRTY = 0x1
FOLIO_UPTODATE = 0x2
FOLIO_FLAGS = FOLIO_DIRTY | FOLIO_UPTODATE
ALL_SEALS = 0x3F  # SEAL|SHRINK|GROW|WRITE|FUTURE_WRITE|EXEC
PFN_BITS = 52
PFN_MASK = (1 << PFN_BITS) - 1
FOLIO_DTYPE = np.dtype([("desc", "<u8"), ("index", "<u8")])
SER_V1 = struct.Struct("<QQQ")
SER_V1_SIZE = SER_V1.size + DESC_SIZE  # 40
SER_V2 = struct.Struct("<QQIIQ")
SER_V2_SIZE = SER_V2.size + DESC_SIZE  # 48


@dataclass(frozen=True)
class Folios:
    """Preserved folios of one memfd: parallel arrays."""

    pfn: np.ndarray  # uint64
    flags: np.ndarray  # uint16
    index: np.ndarray  # uint64 (page offset in the file)

    def __len__(self) -> int:
        return int(self.pfn.shape[0])

    @classmethod
    def empty(cls) -> Folios:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint16), np.zeros(0, np.uint64))


def _check_folios(f: Folios) -> None:
    if not (f.pfn.shape == f.flags.shape == f.index.shape):
        raise AbiError(msg="folio arrays differ in length")
    if len(f) and (int(f.pfn.max()) > PFN_MASK or int(f.flags.max()) & ~FOLIO_FLAGS):
        raise AbiError(msg="folio pfn exceeds 52 bits or flags hold unknown bits")


def _flags_ok(flags: np.ndarray, what: str) -> None:
    if np.any(flags & ~np.uint64(FOLIO_FLAGS)):
        raise AbiError(msg=f"{what}: a folio has unknown flag bits")


# -- FDT era -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemfdState:
    pos: int
    size: int
    folios: Folios


def fdt_alloc_size(nr_folios: int) -> int:
    array = -(-nr_folios * FOLIO_DTYPE.itemsize // PAGE_SIZE) * PAGE_SIZE
    return PAGE_SIZE << get_order(array + PAGE_SIZE)


def encode_fdt(state: MemfdState) -> bytes:
    _check_folios(state.folios)
    arr = np.zeros(len(state.folios), FOLIO_DTYPE)
    arr["desc"] = (state.folios.pfn << np.uint64(PAGE_SHIFT)) | state.folios.flags
    arr["index"] = state.folios.index
    b = fdt.SwBuilder().begin_node("")
    b.prop("pos", fdt.u64(state.pos)).prop("size", fdt.u64(state.size))
    b.prop("folios", arr.tobytes())
    return b.end_node().finish()


def decode_fdt(blob: bytes) -> MemfdState:
    what = "memfd-v1 FDT"
    tree = fdt.parse(blob, what)
    pos, size = tree.root.u64("pos", what), tree.root.u64("size", what)
    _check_file(pos, size, what)
    raw = tree.root.need("folios", what)
    if len(raw) % FOLIO_DTYPE.itemsize:
        raise AbiError(msg=f"{what}: folios is {len(raw)} bytes, not a multiple of 16")
    arr = np.frombuffer(raw, FOLIO_DTYPE)
    arr = arr[arr["desc"] != 0]
    flags = arr["desc"] & np.uint64((1 << PAGE_SHIFT) - 1)
    _flags_ok(flags, what)
    folios = Folios(arr["desc"] >> np.uint64(PAGE_SHIFT), flags.astype(np.uint16),
                    arr["index"].copy())
    _check_layout(size, folios, what)
    return MemfdState(pos, size, folios)


MAX_LFS_FILESIZE = (1 << 63) - 1  # include/linux/fs.h on 64-bit: LLONG_MAX


def _check_file(pos: int, size: int, what: str) -> None:
    """A file the next kernel can create: ``vfs_setpos(file, pos, MAX_LFS_FILESIZE)`` refuses
    a larger position (EINVAL); a size beyond it is no file Linux can have (EFBIG). Linux's
    retrieve trusts the previous kernel here; we refuse instead of building such a file."""
    if size > MAX_LFS_FILESIZE:
        raise AbiError(msg=f"{what}: size {size:#x} exceeds MAX_LFS_FILESIZE", err=errno.EFBIG)
    if pos > MAX_LFS_FILESIZE:
        raise AbiError(msg=f"{what}: position {pos:#x} exceeds MAX_LFS_FILESIZE")


def _check_layout(size: int, folios: Folios, what: str) -> None:
    if len(folios) == 0:
        return
    if has_repeats(folios.index):
        raise AbiError(msg=f"{what}: two folios claim the same file index")
    if int(folios.index.max()) >= -(-size // PAGE_SIZE):
        raise AbiError(msg=f"{what}: a folio lies beyond the file size {size}")


# -- struct era --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemfdSer:
    pos: int
    size: int
    nr_folios: int
    folios: KhoVmalloc
    seals: int = 0  # memfd-v2 only
    compatible: str = MEMFD_V1


# per struct format: its size, and whether it carries the seals (6.19's retrieves every memfd
# unsealable: F_SEAL_SEAL)
SER_SIZE = {MEMFD_V1: SER_V1_SIZE, MEMFD_V2: SER_V2_SIZE}
HAS_SEALS = {MEMFD_V1: False, MEMFD_V2: True}


def encode_ser(ser: MemfdSer) -> bytes:
    if ser.compatible == MEMFD_V1:
        if ser.seals:
            raise AbiError(msg="memfd-v1 cannot carry seals", err=errno.EOPNOTSUPP)
        return SER_V1.pack(ser.pos, ser.size, ser.nr_folios) + ser.folios.encode()
    if ser.compatible == MEMFD_V2:
        if ser.seals & ~ALL_SEALS:
            raise AbiError(msg=f"unknown seals {ser.seals:#x}", err=errno.EOPNOTSUPP)
        return SER_V2.pack(ser.pos, ser.size, ser.seals, 0, ser.nr_folios) + ser.folios.encode()
    raise AbiError(msg=f"unknown memfd format {ser.compatible!r}", err=errno.ENOENT)


def decode_ser(raw: bytes, compatible: str) -> MemfdSer:
    if compatible == MEMFD_V1:
        if len(raw) != SER_V1_SIZE:
            raise AbiError(msg=f"memfd-v1 is {len(raw)} bytes, not {SER_V1_SIZE}")
        pos, size, nr = SER_V1.unpack_from(raw)
        _check_file(pos, size, MEMFD_V1)
        return MemfdSer(pos, size, nr, KhoVmalloc.decode(raw[SER_V1.size :]))
    if compatible == MEMFD_V2:
        if len(raw) != SER_V2_SIZE:
            raise AbiError(msg=f"memfd-v2 is {len(raw)} bytes, not {SER_V2_SIZE}")
        pos, size, seals, flags, nr = SER_V2.unpack_from(raw)
        _check_file(pos, size, MEMFD_V2)
        if seals & ~ALL_SEALS:
            raise AbiError(msg=f"memfd-v2: unknown seals {seals:#x}", err=errno.EOPNOTSUPP)
        if flags:
            raise AbiError(msg=f"memfd-v2: flags {flags:#x} must be 0")
        return MemfdSer(pos, size, nr, KhoVmalloc.decode(raw[SER_V2.size :]), seals, MEMFD_V2)
    raise AbiError(msg=f"unknown memfd format {compatible!r}", err=errno.ENOENT)


def encode_folio_array(folios: Folios) -> bytes:
    _check_folios(folios)
    arr = np.zeros(len(folios), FOLIO_DTYPE)
    arr["desc"] = folios.pfn | (folios.flags.astype(np.uint64) << np.uint64(PFN_BITS))
    arr["index"] = folios.index
    return arr.tobytes()


def decode_folio_array(raw: bytes, nr_folios: int, size: int) -> Folios:
    """The first ``nr_folios`` entries of a restored vmalloc area.

    Entries whose PFN is 0 are skipped, as ``mm/memfd_luo.c`` does in retrieve, finish and
    unpreserve (``if (!pfn) continue;``): an entry the preserving kernel never filled."""
    what = "memfd folio array"
    if nr_folios * FOLIO_DTYPE.itemsize > len(raw):
        raise AbiError(msg=f"{what}: {nr_folios} folios do not fit {len(raw)} bytes")
    arr = np.frombuffer(raw, FOLIO_DTYPE, count=nr_folios)
    arr = arr[(arr["desc"] & np.uint64(PFN_MASK)) != 0]
    flags = arr["desc"] >> np.uint64(PFN_BITS)
    _flags_ok(flags, what)
    folios = Folios(arr["desc"] & np.uint64(PFN_MASK), flags.astype(np.uint16),
                    arr["index"].copy())
    _check_layout(size, folios, what)
    return folios
