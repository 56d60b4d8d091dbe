import errno
import os

import numpy as np
import pytest

from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.mm.buddy import Buddy, block_orders
from liveupdate.kernel.mm.memblock import MEMBLOCK_KHO_SCRATCH, MEMBLOCK_RSRV_KERN, Memblock
from liveupdate.kernel.mm.pages import PageMeta
from tests.kernel.conftest import Rig

MiB = 1 << 20


def test_block_orders_match_kho_split() -> None:
    assert block_orders(3, 9) == [(3, 0), (4, 2), (8, 0)]  # spec/kho.md 3.3 example
    assert block_orders(0, 4096) == [(0, 12)]  # kho_preserve_pages: no MAX_PAGE_ORDER cap
    assert block_orders(0, 4096, 10) == [(0, 10), (1024, 10), (2048, 10), (3072, 10)]


def test_memblock_top_down_and_scratch_only() -> None:
    mb = Memblock()
    mb.add(0, 256 * MiB)
    mb.mark_kho_scratch(64 * MiB, 32 * MiB)
    assert [r.flags for r in mb.memory] == [0, MEMBLOCK_KHO_SCRATCH, 0]
    top = mb.alloc(MiB, MiB)
    assert top == 255 * MiB
    mb.scratch_only = True
    a = mb.alloc(8 * MiB, 2 * MiB)
    assert 64 * MiB <= a and a + 8 * MiB <= 96 * MiB
    with pytest.raises(LiveUpdateError) as e:
        mb.alloc(64 * MiB, MiB)
    assert e.value.errno == errno.ENOMEM and "scratch" in e.value.message
    assert mb.reserved_kern() == 9 * MiB
    mb.reserve(0, MiB)
    assert mb.reserved_kern() == 9 * MiB  # plain reservations do not count
    assert mb.reserved_kern(0, 128 * MiB) == 8 * MiB


def test_memblock_free_ranges_and_bulk_reserve() -> None:
    mb = Memblock()
    mb.add(0, 64 * MiB)
    starts = np.arange(1000, dtype=np.uint64) * np.uint64(2 * 4096)
    mb.reserve_many(starts, starts + np.uint64(4096), MEMBLOCK_RSRV_KERN)
    free = mb.free_ranges()
    assert free[0] == (4096, 8192) and free[-1] == (999 * 8192 + 4096, 64 * MiB)
    assert sum(e - s for s, e in free) == 64 * MiB - 1000 * 4096


def test_buddy_hands_out_boot_memory_upwards() -> None:
    """Linux's order: memblock_free_all frees to the tail, __rmqueue_smallest takes the head,
    expand keeps the lower half -- so a run of allocations after boot is physically
    contiguous, in address order, across the ranges freed (a hugetlb pool: one extent)."""
    b = Buddy(PageMeta(8192))
    b.free_ranges([(0, 1024), (1024, 2048), (4096, 8192)])
    assert [b.alloc(0) for _ in range(3)] == [0, 1, 2]
    assert [b.alloc(9) for _ in range(4)] == [512, 1024, 1536, 4096]
    b.free(1024, 9)  # a later free goes to the head: the next allocation takes it back
    assert b.alloc(9) == 1024


def test_buddy_merges_across_the_ranges_of_one_free_and_keeps_older_blocks_ahead() -> None:
    b = Buddy(PageMeta(4096))
    b.free_ranges([(2048, 3072)])
    b.free_ranges([(0, 512), (512, 1024), (1536, 2048), (1024, 1536)])  # buddies in one call
    assert list(b.free_lists[10]) == [1024, 0, 2048] and b.nr_free == 3072
    assert [b.alloc(10) for _ in range(3)] == [2048, 0, 1024]  # the older block is nearer the head


def test_page_metadata_prepared_before_the_jump_is_used_only_when_it_fits(rig: Rig) -> None:
    from liveupdate.kernel.kernel import Kernel

    nr = os.fstat(rig.ram.fd).st_size >> PAGE_SHIFT
    meta = PageMeta.populated(nr)
    assert not (meta.private.any() or meta.refcount.any() or meta.order.any())
    k = Kernel(rig.ram.fd, None, meta)  # type: ignore[arg-type]  # no machine
    other = Kernel(rig.ram.fd, None, PageMeta.populated(nr - 1))  # type: ignore[arg-type]
    try:
        assert k.meta is meta and other.meta.nr_pages == nr and k.buddy.meta is meta
    finally:
        k.ram.close()
        other.ram.close()


def test_buddy_split_and_coalesce() -> None:
    meta = PageMeta(4096)
    b = Buddy(meta)
    b.free_ranges([(0, 4096)])
    assert b.nr_free == 4096 and all(len(fl) == 0 for fl in b.free_lists[:10])
    pfns = [b.alloc(0) for _ in range(3)]
    assert len(set(pfns)) == 3 and b.nr_free == 4093
    big = b.alloc(10)
    assert big % 1024 == 0 and meta.refcount[big] == 1 and meta.order[big] == 10
    for p in pfns:
        b.free(p, 0)
    b.free(big, 10)
    assert b.nr_free == 4096 and len(b.free_lists[10]) == 4  # fully coalesced again
    with pytest.raises(LiveUpdateError) as e:
        [b.alloc(10) for _ in range(5)]
    assert e.value.errno == errno.ENOMEM
