"""Sizing and reserving KHO scratch on a cold boot (``kho_reserve_scratch``, spec/kho.md 4.1).

Matched against upstream ``kho_parse_scratch_size``, ``scratch_size_update``,
``scratch_size_node`` and ``kho_reserve_scratch`` (6.16-6.19):

* Scale mode (default 200%): lowmem = round_up(kernel reservations below 4 GiB * scale),
  global = round_up(all * scale - lowmem) in *u64* arithmetic -- when every reservation is
  below 4 GiB the subtraction goes negative, wraps, and round_up wraps it back to 0 -- and per
  node = round_up(node's * scale); rounding to ``CMA_MIN_ALIGNMENT_BYTES`` (2 MiB). "Kernel
  reservations" are memblock regions flagged ``MEMBLOCK_RSRV_KERN``: the image, the memmap,
  ``reserve_mem`` regions, early allocations -- so scratch grows with RAM as in Linux.
* Explicit ``kho_scratch=L,G,P``: ``scratch_size_update`` returns early, so lowmem and global
  are used as given; only the per-node size goes through ``round_up``.
* Every area is allocated, zero-sized ones too: ``memblock_phys_alloc(0, align)`` finds an
  address and reserves nothing, so the array always has nodes + 2 entries (one node here) and
  a real handover carries ``{addr, 0}`` entries.
* "scratch scale is N%" / "scratch areas: ..." are printed by the option's parser, so only
  when ``kho_scratch=`` is given and parses, with the values as given (unrounded).

**7.3** (read in 7.3.4 ``kernel/liveupdate/kexec_handover.c``, the ``7.3`` KHO core):
``SCRATCH_ALIGNMENT_BYTES`` is ``PAGE_SIZE * MAX_ORDER_NR_PAGES`` (4 MiB: deferred struct page
init frees MAX_PAGE_ORDER blocks into the buddy allocator) for the rounding and the
allocations; ``scratch_size_update`` no longer returns early, so explicit sizes are rounded
too; the scaled lowmem size is subtracted from the global one before either is rounded; and
``memblock_reserved_hugetlb_size`` is taken off every scaled size (no boot-time HugeTLB
reservation exists in this emulator yet, so it is 0). Earlier cores keep the rules above; no
source of 7.1 or 7.2 was read for this, so the change is attributed to 7.3 alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import bootparams
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.cmdline import ScratchSizes, parse_kho_scratch
from liveupdate.kernel.mm.memblock import PHYS_MAX

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

CMA_MIN_ALIGNMENT_BYTES = 2 << 20
ARCH_LOW_ADDRESS_LIMIT = 1 << 32
MiB = 1 << 20
U64 = (1 << 64) - 1


def _round_to(n: int, align: int) -> int:
    """``round_up`` on a u64: a value within ``align`` of 2^64 wraps to 0, as in C."""
    return (n + align - 1) // align * align & U64


def _round(n: int) -> int:
    return _round_to(n, CMA_MIN_ALIGNMENT_BYTES)


SCRATCH_ALIGNMENT_BYTES_73 = 4 << 20
ALIGN_73_CORES = frozenset({"7.3"})  # the KHO cores that size scratch as 7.3.4 does


def _sizes_73(k: Kernel, spec: ScratchSizes) -> tuple[int, int, int]:
    """7.3.4's ``scratch_size_update`` and ``scratch_size_node``."""
    a = SCRATCH_ALIGNMENT_BYTES_73
    if not spec.scale:
        return _round_to(spec.lowmem, a), _round_to(spec.global_, a), _round_to(spec.pernode, a)
    low = k.memblock.reserved_kern(0, ARCH_LOW_ADDRESS_LIMIT) * spec.scale // 100
    total = k.memblock.reserved_kern() * spec.scale // 100
    return _round_to(low, a), _round_to((total - low) & U64, a), _round_to(total, a)


def alignment(k: Kernel) -> int:
    """The alignment of the scratch areas (and of their sizes) on this kernel's core."""
    return SCRATCH_ALIGNMENT_BYTES_73 if k.gen.kho.name in ALIGN_73_CORES \
        else CMA_MIN_ALIGNMENT_BYTES


def sizes(k: Kernel) -> tuple[int, int, int]:
    spec = ScratchSizes()
    if "kho_scratch" in k.cmdline.params:
        try:
            spec = parse_kho_scratch(k.cmdline.get("kho_scratch"))
        except LiveUpdateError:
            k.cmdline.malformed_option("kho_scratch")
        else:
            k.printk(f"KHO: scratch scale is {spec.scale}%" if spec.scale else
                     f"KHO: scratch areas: lowmem: {spec.lowmem // MiB}MiB global: "
                     f"{spec.global_ // MiB}MiB pernode: {spec.pernode // MiB}MiB")
    if k.gen.kho.name in ALIGN_73_CORES:
        return _sizes_73(k, spec)
    if spec.scale:
        low = _round(k.memblock.reserved_kern(0, ARCH_LOW_ADDRESS_LIMIT) * spec.scale // 100)
        total = k.memblock.reserved_kern() * spec.scale // 100
        return low, _round((total - low) & U64), _round(total)
    return spec.lowmem, spec.global_, _round(spec.pernode)


def reserve(k: Kernel) -> np.ndarray | None:
    got: list[tuple[int, int]] = []
    try:
        for size, hi in zip(sizes(k), (ARCH_LOW_ADDRESS_LIMIT, PHYS_MAX, PHYS_MAX), strict=True):
            got.append((k.memblock.alloc(size, alignment(k), hi=hi, flags=0), size))
    except LiveUpdateError:
        for addr, size in got:
            k.memblock.free(addr, size)
        k.printk("KHO: Failed to reserve scratch area, disabling kexec handover")
        return None
    arr = np.zeros(len(got), bootparams.SCRATCH_DTYPE)
    arr["addr"] = [a for a, _ in got]
    arr["size"] = [s for _, s in got]
    return arr
