"""``reserve_mem=size:align:name`` and its revival through the ``memblock`` KHO subtree.

Matched against upstream ``mm/memblock.c`` (6.16-6.19):

* ``reserve_mem``: at most ``RESERVE_MEM_MAX_ENTRIES`` (8) regions and a name used twice is
  EBUSY; an alignment below ``SMP_CACHE_BYTES`` (64) is raised to it; the size is allocated as
  given (``memblock_phys_alloc(size, align)``, a MEMBLOCK_RSRV_KERN reservation), not rounded.
* ``reserve_mem_kho_revive``: each region is looked up by name in the previous kernel's
  subtree, so a malformed child fails only that region; same size and a start aligned to the
  requested alignment bring it back at the same address with its contents.
* ``reserved_mem_preserve`` (6.19; the 6.16 finalize notifier ORs the errors the same way):
  ``kho_preserve_pages(start page, size >> PAGE_SHIFT)`` for every region; if any fails, all
  are unpreserved and the ``memblock`` subtree is not published -- none survives the kexec.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import fdt
from liveupdate.abi import memblock as memblock_abi
from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.cmdline import ReserveMem, parse_reserve_mem

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel
    from liveupdate.kernel.kho.outgoing import KhoOut

RESERVE_MEM_MAX_ENTRIES = 8
SMP_CACHE_BYTES = 64


def _previous(k: Kernel) -> fdt.Node | None:
    """reserve_mem_kho_retrieve_fdt: the memblock subtree, or None (ENOENT is silent)."""
    if k.kho_in is None:
        return None
    try:
        phys = k.kho_in.retrieve_subtree(memblock_abi.MEMBLOCK_KHO_NODE)
        return memblock_abi.open_subtree(k.mem.read_fdt(phys, "memblock FDT"))
    except LiveUpdateError as e:
        if e.errno != errno.ENOENT:
            k.printk(f"reserve_mem: no usable memblock subtree: {e}")
        return None


def _revive(k: Kernel, prev: fdt.Node | None, rm: ReserveMem, align: int) -> int | None:
    """reserve_mem_kho_revive: the previous start of this region, or None."""
    if prev is None:
        return None
    try:
        old = memblock_abi.lookup(prev, rm.name)
    except AbiError as e:
        k.printk(f"reserve_mem: {rm.name}: not revived: {e.message}")
        return None
    if old.start & (align - 1) or old.size != rm.size:
        k.printk(f"reserve_mem: {rm.name}: not revived: KHO has {old.size:#x} bytes at "
                 f"{old.start:#x}")
        return None
    return old.start


def _add(k: Kernel, prev: fdt.Node | None, value: str) -> None:
    rm = parse_reserve_mem(value)
    if len(k.reserve_mem) >= RESERVE_MEM_MAX_ENTRIES:
        raise LiveUpdateError(err=errno.EBUSY, msg=f"{rm.name}: more than "
                              f"{RESERVE_MEM_MAX_ENTRIES} regions")
    if any(r["name"] == rm.name for r in k.reserve_mem):
        raise LiveUpdateError(err=errno.EBUSY, msg=f"{rm.name}: name already reserved")
    align = max(rm.align, SMP_CACHE_BYTES)
    start = _revive(k, prev, rm, align)
    revived = start is not None
    if start is not None:
        k.memblock.reserve(start, rm.size)
    else:
        start = k.memblock.alloc(rm.size, align)  # MEMBLOCK_RSRV_KERN: counts in scratch sizing
    k.reserve_mem.append({"name": rm.name, "start": f"{start:#x}", "size": rm.size,
                          "revived": revived})
    k.printk(f"reserve_mem: {rm.name} at {start:#x} size {rm.size:#x}"
             + (" (revived from KHO)" if revived else ""))


def init(k: Kernel) -> None:
    values = k.cmdline.multi.get("reserve_mem", [])
    if not values:
        return
    prev = _previous(k)
    for value in values:
        try:
            _add(k, prev, value)
        except LiveUpdateError as e:
            k.printk(f"reserve_mem: {e.message} ({-e.errno})")


def preserve(k: Kernel) -> None:
    """After kho_init: preserve every region, then publish the memblock subtree -- or
    neither (reserved_mem_preserve unwinds on the first failure). On the 6.16-6.18 cores this
    is the finalize notifier, whose failure fails (and aborts) the finalize."""
    if not k.reserve_mem or k.kho_out is None:
        return
    regions = [memblock_abi.ReserveMem(str(r["name"]), int(str(r["start"]), 16),
                                       int(str(r["size"]))) for r in k.reserve_mem]
    # phys_to_page(start), size >> PAGE_SHIFT: the page holding the start, whole pages only
    spans = [(r.start >> PAGE_SHIFT << PAGE_SHIFT, r.size >> PAGE_SHIFT) for r in regions]
    blob = memblock_abi.encode(regions)
    stored: list[int] = []

    def notifier(kout: KhoOut) -> None:
        for i, (r, span) in enumerate(zip(regions, spans, strict=True)):
            try:
                kout.preserve_pages(*span)
            except LiveUpdateError as e:
                for done in spans[:i]:
                    kout.unpreserve_pages(*done)
                # a region first allocated on a KHO boot came from scratch: it cannot be kept
                k.printk(f"reserve_mem: {r.name} cannot be preserved ({e.message}): no "
                         "region will survive a kexec")
                if kout.in_finalize:  # a KEXEC_KHO_FINALIZE notifier fails the finalize
                    raise
                return
        phys = kout.store_again(blob, stored[0] if stored else None)
        stored[:] = [phys]
        # kho-v3+ blob-size: fdt_totalsize, as memblock.c's kho_add_subtree call passes
        kout.add_subtree(memblock_abi.MEMBLOCK_KHO_NODE, phys, len(blob))

    k.kho_out.publish(notifier)
