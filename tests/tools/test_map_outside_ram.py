"""Preserved blocks outside RAM are refused by inspection's decoders (check_ram), naming
the chunk entry or radix leaf and the block; without the flag the map decodes as before
(the booting kernel does its own check, validate_handover)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from liveupdate.abi import kho_memmap, kho_radix
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError
from tests.conftest import FakeRam

BASE = 0x100000
FAR = 1 << 40  # far past the 256 KiB of FakeRam, and aligned to every bitmap span used


def _v1_map(ram: FakeRam, phys: list[int], order: list[int]) -> int:
    bm = kho_memmap.build_bitmaps(np.array(phys, np.uint64), np.array(order, np.uint8))
    bphys = np.array([ram.alloc() for _ in range(len(bm))], np.uint64)
    for p, bits in zip(bphys.tolist(), bm.bits, strict=True):
        ram.put(p, bits.tobytes())
    chunks = np.array([ram.alloc() for _ in range(bm.chunks_needed())], np.uint64)
    for p, page in zip(chunks.tolist(), kho_memmap.encode_chunks(bm, bphys, chunks),
                       strict=True):
        ram.put(p, page)
    return int(chunks[0])


def test_kho_v1_block_far_past_ram_is_refused_naming_chunk_and_block() -> None:
    ram = FakeRam(pages=16, base=BASE)
    inside = BASE + 12 * PAGE_SIZE  # a page the allocator will not reach
    first = _v1_map(ram, [inside, FAR + 3 * PAGE_SIZE], [0, 0])
    loose = kho_memmap.decode_mem_map(ram.mem(), first, 4096)  # no check: as before
    assert sorted(loose.phys.tolist()) == [inside, FAR + 3 * PAGE_SIZE]
    with pytest.raises(AbiError) as e:
        kho_memmap.decode_mem_map(ram.mem(), first, 4096, check_ram=True)
    assert e.value.errno == errno.EFAULT
    msg = e.value.message
    assert f"chunk {first:#x} entry 1" in msg and f"block {FAR + 3 * PAGE_SIZE:#x}+0x1000" in msg
    assert f"phys_start {FAR:#x}" in msg and "outside RAM" in msg


def test_kho_v1_block_straddling_the_end_of_ram_is_refused() -> None:
    ram = FakeRam(pages=16, base=BASE)  # RAM is BASE .. BASE + 64 KiB
    first = _v1_map(ram, [BASE], [4])  # 64 KiB: exactly all of RAM
    assert kho_memmap.decode_mem_map(ram.mem(), first, 4096, check_ram=True).pages() == 16
    first = _v1_map(ram, [BASE], [5])  # 128 KiB: its second half is past the end
    with pytest.raises(AbiError, match=r"order 5.*block 0x100000\+0x20000, outside RAM"):
        kho_memmap.decode_mem_map(ram.mem(), first, 4096, check_ram=True)


def test_radix_leaf_with_block_outside_ram_is_refused() -> None:
    ram = FakeRam(pages=32, base=BASE)
    phys = np.array([BASE, FAR + (1 << 21)], np.uint64)
    order = np.array([0, 9], np.uint8)
    root, pages = kho_radix.encode(phys, order, ram.alloc)
    for p, page in pages.items():
        ram.put(p, page)
    assert len(kho_radix.decode(ram.mem(), root)) == 2
    with pytest.raises(AbiError) as e:
        kho_radix.decode(ram.mem(), root, check_ram=True)
    assert e.value.errno == errno.EFAULT
    assert f"order-9 block {FAR + (1 << 21):#x}+0x200000 lies outside RAM" in e.value.message
    assert "KHO radix leaf 0x" in e.value.message
    inside, more = kho_radix.encode(phys[:1], order[:1], ram.alloc)
    for p, page in more.items():
        ram.put(p, page)
    assert kho_radix.decode(ram.mem(), inside, check_ram=True).phys.tolist() == [BASE]
