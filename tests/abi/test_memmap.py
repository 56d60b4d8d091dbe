import errno
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveupdate.abi import kho_memmap as mm
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError
from liveupdate.kernel.mm.buddy import block_orders
from tests.conftest import FakeRam


def lay_out(ram: FakeRam, phys: np.ndarray, order: np.ndarray, bitmap_bytes: int = 4096,
            slab: bool = False) -> int:
    """Serialize a map into ``ram``; with ``slab``, 512-byte bitmaps share pages as
    kmalloc-512 objects do. Returns the map pointer."""
    bm = mm.build_bitmaps(phys, order, bitmap_bytes)
    if slab:
        base = ram.alloc(-(-len(bm) * 512 // PAGE_SIZE) or 1)
        bphys = np.array([base + 512 * i for i in range(len(bm))], np.uint64)
    else:
        bphys = np.array([ram.alloc() for _ in range(len(bm))], np.uint64)
    for p, bits in zip(bphys.tolist(), bm.bits, strict=True):
        ram.put(p, bits.tobytes())
    cphys = np.array([ram.alloc() for _ in range(bm.chunks_needed())], np.uint64)
    for p, page in zip(cphys.tolist(), mm.encode_chunks(bm, bphys, cphys), strict=True):
        ram.put(p, page)
    return int(cphys[0]) if len(cphys) else 0


def as_set(phys: np.ndarray, order: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(np.asarray(phys).tolist(), np.asarray(order).tolist(), strict=True))


blocks = st.lists(
    st.tuples(st.integers(0, 10), st.integers(0, 1 << 22)).map(
        lambda t: ((t[1] << (t[0] + 12)) & ((1 << 52) - 1) >> (t[0] + 12) << (t[0] + 12), t[0])
    ),
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(blocks, st.sampled_from([4096, 512]))
def test_round_trip(bl: list[tuple[int, int]], bitmap_bytes: int) -> None:
    phys = np.array([p for p, _ in bl], np.uint64)
    order = np.array([o for _, o in bl], np.uint8)
    ram = FakeRam(pages=1200)
    first = lay_out(ram, phys, order, bitmap_bytes)
    got = mm.decode_mem_map(ram.mem(), first, bitmap_bytes)
    assert as_set(got.phys, got.order) == as_set(phys, order)
    # serialization order: orders ascending, then addresses ascending
    keys = list(zip(got.order.tolist(), got.phys.tolist(), strict=True))
    assert keys == sorted(keys)


def test_golden_single_page(ram: FakeRam) -> None:
    first = lay_out(ram, np.array([0x5000], np.uint64), np.array([0], np.uint8))
    bitmap = ram.base  # allocated first
    chunk = ram.mem().read(first, 48)
    assert chunk == struct.pack("<QIIQQ", 0, 0, 1, 0, bitmap) + bytes(16)
    assert ram.mem().read(bitmap, 2) == b"\x20\x00"  # pfn 5 -> bit 5 of byte 0


def test_chunks_split_at_255_and_per_order(ram: FakeRam) -> None:
    bits = mm.BITMAP_BYTES_6_18 * 8
    phys = np.arange(256, dtype=np.uint64) * np.uint64(bits * PAGE_SIZE)  # one bitmap each
    phys = np.concatenate([phys, np.array([1 << 40], np.uint64)])
    order = np.concatenate([np.zeros(256, np.uint8), np.array([3], np.uint8)])
    ram2 = FakeRam(pages=300)
    first = lay_out(ram2, phys, order)
    ce = mm.read_chunks(ram2.mem(), first)
    assert len(ce.chunk_phys) == 3  # 255 + 1 of order 0, a fresh chain for order 3
    assert np.array_equal(np.bincount(ce.order.astype(np.int64)), [256, 0, 0, 1])


def test_detects_512_byte_bitmaps_from_slab_addresses() -> None:
    phys = np.array([0x1000, 0x2000 << 14], np.uint64)
    order = np.zeros(2, np.uint8)
    ram = FakeRam()
    first = lay_out(ram, phys, order, 512, slab=True)
    got = mm.decode_mem_map(ram.mem(), first)
    assert got.bitmap_bytes == 512 and as_set(got.phys, got.order) == as_set(phys, order)
    ram = FakeRam()
    first = lay_out(ram, phys, order, 4096)
    assert mm.decode_mem_map(ram.mem(), first).bitmap_bytes == 4096


def test_detects_512_byte_bitmaps_from_alignment() -> None:
    # page-aligned 512-byte bitmaps: pfn 4096 starts bitmap 1 (4096 bits), which no
    # 32768-bit bitmap could start
    phys = np.array([4096 << 12], np.uint64)
    ram = FakeRam()
    first = lay_out(ram, phys, np.zeros(1, np.uint8), 512)
    assert mm.decode_mem_map(ram.mem(), first).bitmap_bytes == 512


def _chunk(ram: FakeRam, nxt: int, order: int, entries: list[tuple[int, int]],
           num: int | None = None) -> int:
    p = ram.alloc()
    body = b"".join(struct.pack("<QQ", a, b) for a, b in entries)
    ram.put(p, struct.pack("<QII", nxt, order, len(entries) if num is None else num) + body)
    return p


@pytest.mark.parametrize("case, message", [
    ("loop", "loops"), ("num_elms", "num_elms 256"), ("order", "order 37"),
    ("bitmap_outside", "bitmap at"), ("chunk_outside", "chunk at"),
    ("misaligned_chunk", "not page aligned"), ("phys_start", "not aligned"),
])
def test_rejects_bad_maps(case: str, message: str) -> None:
    ram = FakeRam()
    bm = ram.alloc()
    if case == "loop":
        a = _chunk(ram, 0, 0, [(0, bm)])
        b = _chunk(ram, a, 0, [(0, bm)])
        ram.put(a, struct.pack("<Q", b))
        first = a
    elif case == "num_elms":
        first = _chunk(ram, 0, 0, [], num=256)
    elif case == "order":
        first = _chunk(ram, 0, 37, [(0, bm)])
    elif case == "bitmap_outside":
        first = _chunk(ram, 0, 0, [(0, 0xDEAD000)])
    elif case == "chunk_outside":
        first = _chunk(ram, 0xF0000000, 0, [(0, bm)])
    elif case == "misaligned_chunk":
        first = _chunk(ram, ram.base + 8, 0, [(0, bm)])
    else:
        first = _chunk(ram, 0, 0, [(0x1000, bm)])
    with pytest.raises(AbiError, match=message) as e:
        mm.decode_mem_map(ram.mem(), first, 4096)
    assert e.value.errno in (errno.EINVAL, errno.EFAULT)


def test_encode_rejects_unaligned_and_big_orders() -> None:
    with pytest.raises(AbiError, match="aligned"):
        mm.build_bitmaps(np.array([0x1000], np.uint64), np.array([1], np.uint8))
    with pytest.raises(AbiError, match="order 37"):
        mm.build_bitmaps(np.array([0], np.uint64), np.array([37], np.uint8))


def test_reserve_mem_range_golden_upstream_split() -> None:
    """reserve_mem=24M:16M at 16 MiB: kho_preserve_pages splits by min(ctz(pfn),
    ilog2(end_pfn - pfn)) with no MAX_PAGE_ORDER cap -> one order-12 and one order-11 block,
    serialized as two chains (order 11 first, as the tracker's xarray walk goes)."""
    pfn, nr = (16 << 20) >> 12, (24 << 20) >> 12
    blocks = block_orders(pfn, pfn + nr)
    assert blocks == [(4096, 12), (8192, 11)]
    phys = np.array([p << 12 for p, _ in blocks], np.uint64)
    order = np.array([o for _, o in blocks], np.uint8)
    bm = mm.build_bitmaps(phys, order)
    bitmaps, chunks = [0x5000, 0x6000], [0x7000, 0x8000]
    pages = mm.encode_chunks(bm, np.array(bitmaps, np.uint64), np.array(chunks, np.uint64))
    # order 11: pfn 8192 >> 11 = bit 4; order 12: pfn 4096 >> 12 = bit 1; both in bitmap 0
    assert bm.bits[0].tobytes() == b"\x10" + bytes(4095)
    assert bm.bits[1].tobytes() == b"\x02" + bytes(4095)
    assert pages[0].tobytes() == (struct.pack("<QIIQQ", 0x8000, 11, 1, 0, 0x5000)
                                  .ljust(4096, b"\0"))
    assert pages[1].tobytes() == struct.pack("<QIIQQ", 0, 12, 1, 0, 0x6000).ljust(4096, b"\0")
    ram = FakeRam(pages=16, base=0)
    for p, page in zip(bitmaps + chunks, [*bm.bits, *pages], strict=True):
        ram.put(p, page.tobytes())
    got = mm.decode_mem_map(ram.mem(), chunks[0], 4096)
    got_blocks = sorted(zip(got.phys.tolist(), got.order.tolist(), strict=True))
    assert got_blocks == [(16 << 20, 12), (32 << 20, 11)]


def test_merged_ranges() -> None:
    r = mm.merged_ranges(np.array([0x3000, 0x0, 0x1000, 0x10000], np.uint64),
                         np.array([0, 0, 0, 2], np.uint8))
    assert r.tolist() == [[0x0, 0x2000], [0x3000, 0x4000], [0x10000, 0x14000]]


def test_empty_map() -> None:
    got = mm.decode_mem_map(PhysMem(bytearray(4096)), 0)
    assert len(got) == 0
