"""Hostile handovers, structure by structure: each structure that crosses a kexec is built
valid, then one of its invariants is broken on purpose -- a pointer out of RAM, a chain that
loops, a count larger than its block, a name without its NUL, sizes and indexes that
contradict each other or exceed Linux's limits. Every corruption must be refused by the
decoder with *its* reason (an AbiError naming the broken thing), never another exception.
Random bytes and blind mutations are tests/abi/test_fuzz.py; this is the targeted class."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest

from liveupdate.abi import (
    fdt,
    hugetlb,
    kho,
    kho_memmap,
    luo_session,
    luo_v3,
    memblock,
    memfd,
    vmalloc,
)
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError
from tests.conftest import FakeRam

BASE = 0x100000
OUTSIDE = 0x7FFF_0000_0000


def _map(bitmap_bytes: int = 4096) -> tuple[FakeRam, int]:
    """A valid kho-v1 memory map of two orders in RAM; returns it and the first chunk."""
    ram = FakeRam(pages=24, base=BASE)
    bm = kho_memmap.build_bitmaps(np.array([0x200000, 0x400000], np.uint64),
                                  np.array([0, 9], np.uint8), bitmap_bytes)
    chunks = np.array([ram.alloc() for _ in range(bm.chunks_needed())], np.uint64)
    per = PAGE_SIZE // bitmap_bytes
    pages = [ram.alloc() for _ in range(-(-len(bm) // per))]
    bphys = np.array([pages[i // per] + (i % per) * bitmap_bytes for i in range(len(bm))],
                     np.uint64)
    for p, bits in zip(bphys.tolist(), bm.bits, strict=True):
        ram.put(p, bits.tobytes())
    for p, page in zip(chunks.tolist(), kho_memmap.encode_chunks(bm, bphys, chunks),
                       strict=True):
        ram.put(p, page)
    return ram, int(chunks[0])


def _memmap(damage: Callable[[FakeRam, int], None], bitmap_bytes: int = 4096) -> None:
    ram, first = _map(bitmap_bytes)
    damage(ram, first)
    kho_memmap.decode_mem_map(ram.mem(), first, bitmap_bytes)


def _vmalloc_area() -> tuple[FakeRam, vmalloc.KhoVmalloc]:
    ram = FakeRam(pages=24, base=BASE)
    data = bytes(range(256)) * 40  # 10240 bytes: three order-0 blocks
    nblocks, nchunks = vmalloc.pages_needed(len(data))
    lay = vmalloc.layout(data, np.array([ram.alloc() for _ in range(nblocks)], np.uint64),
                         np.array([ram.alloc() for _ in range(nchunks)], np.uint64))
    for p, page in lay.pages:
        ram.put(p, page)
    return ram, lay.desc


def _vmalloc(damage: Callable[[FakeRam, vmalloc.KhoVmalloc], vmalloc.KhoVmalloc]) -> None:
    ram, desc = _vmalloc_area()
    vmalloc.decode(ram.mem(), damage(ram, desc))


def _sessions(damage: Callable[[FakeRam, int, int], None]) -> None:
    ram = FakeRam(pages=40, base=BASE)
    files = ram.alloc(luo_session.FILE_PGCNT)
    ram.put(files, luo_session.encode_files([luo_session.FileSer("memfd-v1", 0x1000, 7),
                                             luo_session.FileSer("memfd-v1", 0x2000, 8)]))
    header = ram.alloc(luo_session.SESSION_PGCNT)
    ram.put(header, luo_session.encode_sessions([("vm0", files, 2), ("vm1", 0, 0)]))
    damage(ram, header, files)
    luo_session.decode_sessions(ram.mem(), header)


def _flbs(header: bytes) -> None:
    ram = FakeRam(pages=4, base=BASE)
    ram.put(BASE, header.ljust(PAGE_SIZE, b"\0"))
    luo_session.decode_flbs(ram.mem(), BASE)


def _entry(header: int, i: int, field: str) -> int:
    """Address of field ``field`` of session entry ``i`` in a header block."""
    return header + 8 + i * luo_session.SESSION_DTYPE.itemsize + \
        luo_session.SESSION_DTYPE.fields[field][1]


def _ser(raw: bytes, compat: str = memfd.MEMFD_V1) -> None:
    memfd.decode_ser(raw, compat)


V = vmalloc.KhoVmalloc(0x101000, 1, 1, 0)
MAX_LFS_FILESIZE = memfd.MAX_LFS_FILESIZE
CASES: dict[str, tuple[Callable[[], object], str]] = {
    # the kho-v1 memory map: a chain of chunk pages pointing at bitmaps
    "map: chunk chain loops": (lambda: _memmap(lambda r, f: r.put(f, struct.pack("<Q", f))),
                               "loop"),
    "map: next chunk outside RAM": (
        lambda: _memmap(lambda r, f: r.put(f, struct.pack("<Q", OUTSIDE))), "outside"),
    "map: next chunk misaligned": (
        lambda: _memmap(lambda r, f: r.put(f, struct.pack("<Q", f + 0x10))), "align"),
    "map: more entries than a chunk holds": (
        lambda: _memmap(lambda r, f: r.put(f + 12, struct.pack("<I", 256))), "num_elms"),
    "map: order beyond the map's limit": (
        lambda: _memmap(lambda r, f: r.put(f + 8, struct.pack("<I", 64))), "order"),
    "map: bitmap outside RAM": (
        lambda: _memmap(lambda r, f: r.put(f + 24, struct.pack("<Q", OUTSIDE))), "bitmap"),
    "map: phys_start off its bitmap span": (
        lambda: _memmap(lambda r, f: r.put(f + 16, struct.pack("<Q", 0x1000))), "aligned"),
    "map (6.16 bitmaps): bitmap outside RAM": (
        lambda: _memmap(lambda r, f: r.put(f + 24, struct.pack("<Q", OUTSIDE)), 512),
        "bitmap"),
    # kho_vmalloc: a chain of chunk pages listing blocks
    "vmalloc: chunk chain loops": (
        lambda: _vmalloc(lambda r, d: (r.put(d.first, struct.pack("<Q", d.first)), d)[1]),
        "loops"),
    "vmalloc: first chunk outside RAM": (
        lambda: _vmalloc(lambda r, d: vmalloc.KhoVmalloc(OUTSIDE, d.total_pages, d.flags,
                                                         d.order)), "outside"),
    "vmalloc: blocks beyond total_pages": (
        lambda: _vmalloc(lambda r, d: vmalloc.KhoVmalloc(d.first, 1, d.flags, d.order)),
        "total_pages"),
    "vmalloc: total_pages beyond the blocks": (
        lambda: _vmalloc(lambda r, d: vmalloc.KhoVmalloc(d.first, 99, d.flags, d.order)),
        "total_pages"),
    "vmalloc: unknown flags": (
        lambda: _vmalloc(lambda r, d: vmalloc.KhoVmalloc(d.first, d.total_pages, 0x80,
                                                         d.order)), "flags"),
    "vmalloc: order beyond MAX_PAGE_ORDER": (
        lambda: _vmalloc(lambda r, d: vmalloc.KhoVmalloc(d.first, d.total_pages, d.flags,
                                                         11)), "order"),
    # LUO sessions (6.19+): a header block of fixed-size entries, each with a file array
    "sessions: count larger than the header block": (
        lambda: _sessions(lambda r, h, f: r.put(h, struct.pack("<Q", 820))), "count"),
    "sessions: name without its NUL": (
        lambda: _sessions(lambda r, h, f: r.put(_entry(h, 0, "name"), b"x" * 64)), "NUL"),
    "sessions: the same name twice": (
        lambda: _sessions(lambda r, h, f: r.put(_entry(h, 1, "name"), b"vm0\0")),
        "duplicate session"),
    "sessions: more files than a session holds": (
        lambda: _sessions(lambda r, h, f: r.put(_entry(h, 0, "count"), struct.pack("<Q", 129))),
        "files >"),
    "sessions: file array outside RAM": (
        lambda: _sessions(lambda r, h, f: r.put(_entry(h, 0, "files"),
                                                struct.pack("<Q", OUTSIDE))), "outside"),
    "sessions: files counted but no array": (
        lambda: _sessions(lambda r, h, f: r.put(_entry(h, 1, "count"), struct.pack("<Q", 1))),
        "no file array"),
    "sessions: the same token twice": (
        lambda: _sessions(lambda r, h, f: r.put(f + 48 + 8 + 64, struct.pack("<Q", 7))),
        "duplicate token"),
    "sessions: handler compatible without its NUL": (
        lambda: _sessions(lambda r, h, f: r.put(f, b"m" * 48)), "NUL"),
    "FLB header (7.x): more entries than its page holds": (
        lambda: _flbs(struct.pack("<QQ", 1, luo_session.FLB_MAX + 1)), "count"),
    "FLB header (7.x): a header of two pages": (
        lambda: _flbs(struct.pack("<QQ", 2, 1)), "pgcnt"),
    "FLB: a name without its NUL": (
        lambda: _flbs(struct.pack("<QQ", 1, 1) + b"f" * 48 + struct.pack("<QQ", 0x1000, 1)),
        "NUL"),
    # LUO v3: the files FDT names each file by its token
    "files FDT (v3): the same token twice": (
        lambda: luo_v3.decode_files_fdt(luo_v3.encode_files_fdt([
            luo_v3.FileEntry(0x1A, "memfd-v1", 0x2000),
            luo_v3.FileEntry(0x1B, "memfd-v1", 0x3000)]).replace(b"1b\0", b"1a\0")),
        "duplicate token"),
    "files FDT (v3): a node that is not a token": (
        lambda: luo_v3.decode_files_fdt(luo_v3.encode_files_fdt([
            luo_v3.FileEntry(0x1A, "memfd-v1", 0x2000)]).replace(b"1a\0", b"zz\0")),
        "not a token"),
    # memfd: struct memfd-v1 / memfd-v2 and its folio array
    "memfd-v1: wrong length": (lambda: _ser(memfd.encode_ser(memfd.MemfdSer(0, 4096, 1, V))
                                            + b"\0"), "bytes, not"),
    "memfd-v1: size beyond MAX_LFS_FILESIZE": (
        lambda: _ser(memfd.encode_ser(memfd.MemfdSer(0, MAX_LFS_FILESIZE + 1, 1, V))),
        "MAX_LFS_FILESIZE"),
    "memfd-v1: position beyond MAX_LFS_FILESIZE": (
        lambda: _ser(memfd.encode_ser(memfd.MemfdSer(1 << 63, 4096, 1, V))),
        "MAX_LFS_FILESIZE"),
    "memfd-v2: unknown seals": (
        lambda: _ser(struct.pack("<QQIIQ", 0, 4096, 0x400, 0, 1) + V.encode(), memfd.MEMFD_V2),
        "seals"),
    "memfd-v2: reserved flags set": (
        lambda: _ser(struct.pack("<QQIIQ", 0, 4096, 0, 1, 1) + V.encode(), memfd.MEMFD_V2),
        "flags"),
    "folios: more than the array holds": (
        lambda: memfd.decode_folio_array(bytes(16), 2, 8192), "do not fit"),
    "folios: a folio beyond the file size": (
        lambda: memfd.decode_folio_array(struct.pack("<QQ", 0x200 | 2 << 52, 5), 1, 8192),
        "beyond the file size"),
    "folios: two folios at one index": (
        lambda: memfd.decode_folio_array(struct.pack("<QQQQ", 0x200 | 2 << 52, 0,
                                                     0x300 | 2 << 52, 0), 2, 8192),
        "same file index"),
    "folios: unknown flag bits": (
        lambda: memfd.decode_folio_array(struct.pack("<QQ", 0x200 | 8 << 52, 0), 1, 8192),
        "flag bits"),
    # hugetlb (the RFC): the pools' FLB, a huge memfd and its folio array
    "hugetlb-v1: more hstates than the ABI has": (
        lambda: hugetlb.decode_flb(bytes(36) + b"\x05"), "nr_hstates"),
    "hugetlb-v1: an hstate of order 0": (
        lambda: hugetlb.decode_flb(bytes(36) + b"\x01"), "order 0"),
    "hugetlb-v1: two hstates of one order": (
        lambda: hugetlb.decode_flb(struct.pack("<QBQB", 1, 9, 2, 9) + bytes(18) + b"\x02"),
        "one order"),
    "huge-memfd-v1: size not a multiple of the huge page": (
        lambda: hugetlb.decode_ser(struct.pack("<QQQ", 4096, 0, 0) + bytes(16) + b"\x09"),
        "multiple"),
    "huge-memfd-v1: more folios than the size holds": (
        lambda: hugetlb.decode_ser(struct.pack("<QQQ", 2 << 20, 0, 2)
                                   + vmalloc.KhoVmalloc(0x1000, 1, 1, 0).encode() + b"\x09"),
        "do not fit"),
    "huge-memfd-v1: folios counted but no array": (
        lambda: hugetlb.decode_ser(struct.pack("<QQQ", 2 << 20, 0, 1) + bytes(16) + b"\x09"),
        "folio array"),
    "huge-memfd-v1: a folio not aligned to its order": (
        lambda: hugetlb.decode_folios(struct.pack("<QQ", 0x201, 0), HUGE_SER), "aligned"),
    "huge-memfd-v1: a folio past the end": (
        lambda: hugetlb.decode_folios(struct.pack("<QQ", 0x200, 1024), HUGE_SER), "past the end"),
    "huge-memfd-v1: reserved bits set": (
        lambda: hugetlb.decode_folios(struct.pack("<QQ", 0x200 | 1 << 60, 0), HUGE_SER),
        "reserved"),
    "huge-memfd-v1: two folios at one index": (
        lambda: hugetlb.decode_folios(struct.pack("<QQQQ", 0x200, 0, 0x400, 0),
                                      hugetlb.HugeMemfdSer(4 << 20, 0, 2, V, 9)), "share"),
    # FDT-level: the KHO root and the memblock subtree
    "kho root: preserved-memory-map of the wrong length": (
        lambda: kho.decode_root(fdt.SwBuilder().begin_node("")
                                .prop("compatible", fdt.string(kho.KHO_FDT_COMPATIBLE))
                                .prop(kho.MEM_MAP_PROP, bytes(4)).end_node().finish(),
                                require_map=True), "preserved-memory-map"),
    "kho root: not kho-v1": (
        lambda: kho.decode_root(kho.encode_root_sequential(0x1000, []).replace(
            b"kho-v1", b"kho-v9")), "kho-v1"),
    "memblock: a region that is not reserve-mem-v1": (
        lambda: memblock.decode(memblock.encode([memblock.ReserveMem("r", 0x1000, 0x2000)])
                                .replace(b"reserve-mem-v1", b"reserve-mem-v9")),
        "reserve-mem-v1"),
    "memfd-v1 FDT (v3): size beyond MAX_LFS_FILESIZE": (
        lambda: memfd.decode_fdt(memfd.encode_fdt(memfd.MemfdState(
            0, MAX_LFS_FILESIZE + 1, memfd.Folios.empty()))), "MAX_LFS_FILESIZE"),
}


HUGE_SER = hugetlb.HugeMemfdSer(2 << 20, 0, 1, V, 9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_is_refused_with_its_reason(case: str) -> None:
    build, reason = CASES[case]
    with pytest.raises(AbiError) as e:
        build()
    assert reason.lower() in e.value.message.lower(), e.value.message


def test_the_valid_structures_decode() -> None:
    """The baselines the corruptions start from are themselves good."""
    _memmap(lambda r, f: None)
    _memmap(lambda r, f: None, 512)
    _vmalloc(lambda r, d: d)
    _sessions(lambda r, h, f: None)
    _ser(memfd.encode_ser(memfd.MemfdSer(0, 4096, 1, V)))
