"""``reserve_mem=size:align:name`` and its revival through the ``memblock`` KHO subtree.

On a KHO boot a region whose name, compatible, size and alignment match the previous kernel's
``memblock`` subtree comes back at the same physical address with its contents; otherwise it is
allocated afresh. After ``kho_init`` every region is preserved again and the subtree re-added,
so regions survive any number of kexecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.abi import memblock as memblock_abi
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.cmdline import parse_reserve_mem

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def _previous(k: Kernel) -> dict[str, memblock_abi.ReserveMem]:
    if k.kho_in is None:
        return {}
    try:
        phys = k.kho_in.retrieve_subtree(memblock_abi.MEMBLOCK_KHO_NODE)
        return {r.name: r for r in memblock_abi.decode(k.mem.read_fdt(phys, "memblock FDT"))}
    except (LiveUpdateError, AbiError) as e:
        k.printk(f"reserve_mem: no usable memblock subtree: {e}")
        return {}


def init(k: Kernel) -> None:
    values = k.cmdline.multi.get("reserve_mem", [])
    if not values:
        return
    previous = _previous(k)
    for value in values:
        try:
            rm = parse_reserve_mem(value)
        except LiveUpdateError as e:
            k.printk(f"reserve_mem: {e.message}")
            continue
        old = previous.get(rm.name)
        revived = old is not None and old.size == rm.size and old.start % rm.align == 0
        if old is not None and revived:
            start = old.start
            k.memblock.reserve(start, rm.size)
        else:
            try:
                # memblock_phys_alloc reserves MEMBLOCK_RSRV_KERN: part of scratch sizing
                start = k.memblock.alloc(-(-rm.size // PAGE_SIZE) * PAGE_SIZE,
                                         max(rm.align, PAGE_SIZE))
            except LiveUpdateError as e:
                k.printk(f"reserve_mem: {rm.name}: {e.message}")
                continue
        k.reserve_mem.append({"name": rm.name, "start": f"{start:#x}", "size": rm.size,
                              "revived": revived})
        k.printk(f"reserve_mem: {rm.name} at {start:#x} size {rm.size:#x}"
                 + (" (revived from KHO)" if revived else ""))


def preserve(k: Kernel) -> None:
    """After kho_init: preserve every region and publish the memblock subtree."""
    if not k.reserve_mem or k.kho_out is None:
        return
    regions = [memblock_abi.ReserveMem(str(r["name"]), int(str(r["start"]), 16),
                                       int(str(r["size"]))) for r in k.reserve_mem]
    kept = []
    for r in regions:
        try:
            k.kho_out.preserve_pages(r.start, -(-r.size // PAGE_SIZE))
            kept.append(r)
        except LiveUpdateError as e:
            # a region first allocated on a KHO boot came from scratch: it cannot be kept
            k.printk(f"reserve_mem: {r.name} will not survive a kexec: {e.message}")
    if not kept:
        return
    phys = k.kho_out.store(memblock_abi.encode(kept))
    k.kho_out.add_subtree(memblock_abi.MEMBLOCK_KHO_NODE, phys)
