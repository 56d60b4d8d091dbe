"""``kho_extend_scratch`` (Linux 7.3.4 ``kernel/liveupdate/kexec_handover.c``), the 7.3 KHO
core's only (:attr:`liveupdate.kernel.kho.core.KhoCore.extends_scratch`).

On a KHO boot ``kho_memory_init_early`` (the first step of ``mm_core_init_early``, before the
memmap is allocated) calls it right after ``kho_populate`` put memblock in scratch-only mode.
It cuts physical memory into 1 GiB blocks (``KHO_SCRATCH_EXT_BLKSIZE``, a fixed heuristic: no
config or command-line switch), calls a block *busy* when a preserved block of the incoming
map or a page of the map itself (its radix tree tables, not preserved but read later) lies in
it, and marks everything else ``MEMBLOCK_KHO_SCRATCH`` -- the gaps between busy blocks in
ascending order from address 0, then from the last busy block to the end of DRAM. Marking
touches only memblock's ``memory`` regions, so holes stay holes, and memblock's reservations
still apply. It prints nothing unless it fails (``KHO: Failed to extend scratch: -ENOMEM``,
keeping what it had marked).

What it changes is where early allocations may go while scratch-only mode lasts (the memmap,
``reserve_mem``, hugetlb boot pages): not the scratch areas handed to the *next* kernel.
``kho_fill_kimage`` and ``kho_locate_mem_hole`` use ``kho_scratch[]``, the array inherited
from ``kho_populate``, unchanged; so do debugfs ``scratch_phys``/``scratch_len`` and the
``Memory: ... in KHO scratch`` line. The marked regions are visible in memblock (Linux:
``/sys/kernel/debug/memblock/memory``'s ``KHO_SCRATCH`` flag; here ``luoctl kho``'s
``in.memblock_scratch``).

Deviations: the busy-block radix tree Linux builds (and frees) in scratch is a numpy array
here, so this never fails and allocates nothing; a preserved block is counted busy in every
1 GiB block it touches (Linux steps 1 GiB from its start, the same for the naturally aligned
blocks KHO preserves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi.consts import PAGE_SHIFT

if TYPE_CHECKING:
    from liveupdate.abi.kho_memmap import PreservedMemory
    from liveupdate.kernel.mm.memblock import Memblock

BLKSHIFT = 30  # KHO_SCRATCH_EXT_BLKSHIFT: const_ilog2(SZ_1G)
BLKSIZE = 1 << BLKSHIFT


def busy_blocks(pm: PreservedMemory) -> np.ndarray:
    """The 1 GiB block numbers holding preserved memory or the map's own pages, ascending
    (``kho_ext_walk_leaf`` and ``kho_ext_walk_node`` digesting the incoming radix tree)."""
    phys = np.asarray(pm.phys, np.uint64)
    end = phys + (np.uint64(1) << (pm.order.astype(np.uint64) + np.uint64(PAGE_SHIFT)))
    first = phys >> np.uint64(BLKSHIFT)
    last = (end - np.uint64(1)) >> np.uint64(BLKSHIFT)
    parts = [first, np.asarray(pm.tables, np.uint64) >> np.uint64(BLKSHIFT)]
    for lo, hi in zip(first[last > first].tolist(), last[last > first].tolist(), strict=True):
        parts.append(np.arange(lo, hi + 1, dtype=np.uint64))  # a block of 1 GiB or more
    return np.unique(np.concatenate(parts))


def extend_scratch(memblock: Memblock, pm: PreservedMemory) -> list[tuple[int, int]]:
    """``kho_extend_scratch``: mark every 1 GiB block without preserved memory as scratch
    (``kho_ext_mark_scratch``, then up to ``memblock_end_of_DRAM``). Returns the ranges it
    marked, ``(base, size)`` ascending."""
    marked: list[tuple[int, int]] = []
    prev_end = 0
    for block in busy_blocks(pm).tolist():
        start = block << BLKSHIFT
        if start > prev_end:
            marked.append((prev_end, start - prev_end))
        prev_end = start + BLKSIZE
    dram_end = max((r.end for r in memblock.memory), default=0)
    if prev_end < dram_end:
        marked.append((prev_end, dram_end - prev_end))
    for base, size in marked:
        memblock.mark_kho_scratch(base, size)
    return marked
