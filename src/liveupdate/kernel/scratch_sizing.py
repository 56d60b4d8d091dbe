"""Sizing and reserving KHO scratch on a cold boot (``kho_reserve_scratch``, spec/kho.md 4.1).

Scale mode (default 200%): lowmem = round_up(kernel reservations below 4 GiB * scale), global =
round_up(all * scale - lowmem), per node = round_up(node's * scale), each rounded to
``CMA_MIN_ALIGNMENT_BYTES`` (2 MiB). "Kernel reservations" are memblock regions flagged
``MEMBLOCK_RSRV_KERN``: the image's load size, the memmap, early allocations -- so scratch grows
with RAM as in Linux. Explicit ``kho_scratch=L,G,P`` sizes are rounded the same way. One NUMA
node. Areas of size zero are left out of the array (Linux would try to allocate them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import bootparams
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.cmdline import ScratchSizes, parse_kho_scratch

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

CMA_MIN_ALIGNMENT_BYTES = 2 << 20
ARCH_LOW_ADDRESS_LIMIT = 1 << 32
MiB = 1 << 20


def _round(n: int) -> int:
    return -(-max(n, 0) // CMA_MIN_ALIGNMENT_BYTES) * CMA_MIN_ALIGNMENT_BYTES


def sizes(k: Kernel) -> tuple[int, int, int]:
    spec = ScratchSizes()
    if "kho_scratch" in k.cmdline.params:
        try:
            spec = parse_kho_scratch(k.cmdline.get("kho_scratch"))
        except LiveUpdateError:
            k.cmdline.malformed_option("kho_scratch")
    if spec.scale:
        k.printk(f"KHO: scratch scale is {spec.scale}%")
        low = _round(k.memblock.reserved_kern(0, ARCH_LOW_ADDRESS_LIMIT) * spec.scale // 100)
        total = k.memblock.reserved_kern() * spec.scale // 100
        return low, _round(total - low), _round(total)
    return _round(spec.lowmem), _round(spec.global_), _round(spec.pernode)


def reserve(k: Kernel) -> np.ndarray | None:
    low, glob, node = sizes(k)
    k.printk(f"KHO: scratch areas: lowmem: {low // MiB}MiB global: {glob // MiB}MiB "
             f"pernode: {node // MiB}MiB")
    got: list[tuple[int, int]] = []
    try:
        for size, hi in ((low, ARCH_LOW_ADDRESS_LIMIT), (glob, 1 << 64), (node, 1 << 64)):
            if size:
                got.append((k.memblock.alloc(size, CMA_MIN_ALIGNMENT_BYTES, hi=hi, flags=0),
                            size))
    except LiveUpdateError:
        for addr, size in got:
            k.memblock.free(addr, size)
        k.printk("KHO: Failed to reserve scratch area, disabling kexec handover")
        return None
    arr = np.zeros(len(got), bootparams.SCRATCH_DTYPE)
    arr["addr"] = [a for a, _ in got]
    arr["size"] = [s for _, s in got]
    return arr
