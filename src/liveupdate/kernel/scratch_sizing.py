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


def _round(n: int) -> int:
    """``round_up`` on a u64: a value within 2 MiB of 2^64 wraps to 0, as in C."""
    return (n + CMA_MIN_ALIGNMENT_BYTES - 1) // CMA_MIN_ALIGNMENT_BYTES \
        * CMA_MIN_ALIGNMENT_BYTES & U64


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
    if spec.scale:
        low = _round(k.memblock.reserved_kern(0, ARCH_LOW_ADDRESS_LIMIT) * spec.scale // 100)
        total = k.memblock.reserved_kern() * spec.scale // 100
        return low, _round((total - low) & U64), _round(total)
    return spec.lowmem, spec.global_, _round(spec.pernode)


def reserve(k: Kernel) -> np.ndarray | None:
    got: list[tuple[int, int]] = []
    try:
        for size, hi in zip(sizes(k), (ARCH_LOW_ADDRESS_LIMIT, PHYS_MAX, PHYS_MAX), strict=True):
            got.append((k.memblock.alloc(size, CMA_MIN_ALIGNMENT_BYTES, hi=hi, flags=0), size))
    except LiveUpdateError:
        for addr, size in got:
            k.memblock.free(addr, size)
        k.printk("KHO: Failed to reserve scratch area, disabling kexec handover")
        return None
    arr = np.zeros(len(got), bootparams.SCRATCH_DTYPE)
    arr["addr"] = [a for a, _ in got]
    arr["size"] = [s for _, s in got]
    return arr
