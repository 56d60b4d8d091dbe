import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveupdate.abi import vmalloc
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError
from tests.conftest import FakeRam


def store(ram: FakeRam, nblocks: int, order: int = 0) -> vmalloc.KhoVmalloc:
    blocks = np.array([0x4000_0000 + i * (PAGE_SIZE << order) for i in range(nblocks)],
                      np.uint64)
    chunks = np.array([ram.alloc() for _ in range(vmalloc.chunks_needed(nblocks))], np.uint64)
    for p, page in zip(chunks.tolist(), vmalloc.encode_chunks(blocks, chunks), strict=True):
        ram.put(p, page)
    return vmalloc.KhoVmalloc(int(chunks[0]), nblocks << order, vmalloc.KHO_VMALLOC_ALLOC,
                              order)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1300), st.integers(0, 3))
def test_round_trip(n: int, order: int) -> None:
    ram = FakeRam(pages=8)
    desc = store(ram, n, order)
    assert vmalloc.KhoVmalloc.decode(desc.encode()) == desc
    area = vmalloc.decode(ram.mem(), desc)
    assert len(area.block_phys) == n and len(area.chunk_phys) == n // 511 + 1
    assert area.block_phys.tolist() == [0x4000_0000 + i * (PAGE_SIZE << order)
                                        for i in range(n)]


def test_full_chunk_is_followed_by_an_empty_one(ram: FakeRam) -> None:
    desc = store(ram, 511)
    first = ram.mem().read(desc.first, PAGE_SIZE)
    nxt = struct.unpack_from("<Q", first)[0]
    assert nxt and struct.unpack_from("<Q", first, PAGE_SIZE - 8)[0] != 0  # no terminator
    assert ram.mem().read(nxt, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_descriptor_golden() -> None:
    d = vmalloc.KhoVmalloc(0x1234000, 5, 0x3, 2)
    assert d.encode() == bytes.fromhex("0040230100000000" "05000000" "0300" "0200")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: vmalloc.KhoVmalloc(d.first, d.total_pages, 0x4, d.order), "unknown flags"),
    (lambda d: vmalloc.KhoVmalloc(d.first, d.total_pages + 1, d.flags, d.order), "cover 3"),
    (lambda d: vmalloc.KhoVmalloc(d.first, 2, d.flags, d.order), "more than total_pages"),
    (lambda d: vmalloc.KhoVmalloc(d.first, d.total_pages, d.flags, 11), "order 11"),
    (lambda d: vmalloc.KhoVmalloc(0x7000_0000, d.total_pages, d.flags, d.order), "outside"),
])
def test_rejects(mutate, message) -> None:  # type: ignore[no-untyped-def]
    ram = FakeRam()
    desc = store(ram, 3)
    with pytest.raises(AbiError, match=message):
        vmalloc.decode(ram.mem(), mutate(desc))


def test_rejects_loop(ram: FakeRam) -> None:
    desc = store(ram, 3)
    ram.put(desc.first, struct.pack("<Q", desc.first))
    with pytest.raises(AbiError, match="loops"):
        vmalloc.decode(ram.mem(), desc)
