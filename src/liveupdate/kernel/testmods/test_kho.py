"""Port of lib/test_kho.c (spec/kho.md 7.1); ``test_kho=1``.

First boot: allocate folios of random orders until ``max_mem`` (8 MiB), fill them with random
bytes, checksum them, describe them in a ``kho-test-v1`` sub-FDT (``folios_info``: the
``phys | order`` of each) and preserve everything under the ``kho_test`` subtree. Next boot:
check the FDT, restore every folio requiring the recorded order, re-checksum, and print "KHO
restore succeeded". The checksum is a 32-bit ones'-complement sum of 16-bit words
(csum_partial's arithmetic, not bit-identical to x86's; both boots use this one).

By KHO core (:data:`RULES`; spec/kho.md 7.1):

* ``folios_info``: inline in the FDT on 6.16; from 6.18 a 16-byte ``struct kho_vmalloc`` of
  the array (``kho_preserve_vmalloc``). The subtree's ``blob-size`` is ``fdt_totalsize`` where
  the root carries sizes (7.1+).
* **7.3** (read in 7.3.4 ``lib/test_kho.c``): ``module_init`` of a built-in object is a
  ``device_initcall``, so the subtree is added before LUO's ``late_initcall`` (the root lists
  it after LUO's: ``fdt_add_subnode`` inserts first); ``kho_test_init`` either restores what
  it found (then saves nothing) or, on ENOENT, saves.
* Before 7.3 two deviations are kept for the chained-kexec tests of those cores: the subtree
  is added after LUO's, and a successful restore saves a fresh set, so every hop is verified.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import khotest
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SIZE, get_order
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.kho.outgoing import KhoOut

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

MAX_MEM = (PAGE_SIZE << MAX_PAGE_ORDER) * 2


@dataclass(frozen=True)
class Rules:
    form: str  # khotest.decode's form of folios_info: "inline" or "vmalloc"
    initcall: str  # the testmods hook it runs at: "late" (after LUO) or "device" (before)
    resave: bool  # a successful restore is followed by a fresh save


RULES = {  # by KHO core
    "6.16": Rules("inline", "late", resave=True),
    "6.18": Rules("vmalloc", "late", resave=True),
    "6.19": Rules("vmalloc", "late", resave=True),
    "7.1": Rules("vmalloc", "late", resave=True),
    "7.3": Rules("vmalloc", "device", resave=False),
}


def rules(k: Kernel) -> Rules:
    return RULES[k.gen.kho.name]


def csum_partial(data: bytes, csum: int = 0) -> int:
    s = int(np.frombuffer(data, "<u2").astype(np.uint64).sum()) + csum
    while s >> 32:
        s = (s & 0xFFFFFFFF) + (s >> 32)
    return s


def clamp_order(order: int, left: int) -> int:
    """kho_test_generate_data: an order that overshoots ``left`` bytes becomes one below
    ``get_order(left)`` -- so 16 KiB left gives an 8 KiB folio, as upstream, not 16 KiB."""
    if PAGE_SIZE << order > left:
        order = max(get_order(left) - 1, 0)
    return order


def save(k: Kernel) -> None:
    """Generate the data once; preserve it and add the subtree now (6.19+) or from the
    KEXEC_KHO_FINALIZE notifier at every finalize (6.16-6.18), as upstream."""
    kout = k.require_kho()
    rng = random.Random(os.urandom(8))
    info, csum, total = [], 0, 0
    while total < MAX_MEM:
        order = clamp_order(rng.randrange(0, MAX_PAGE_ORDER + 1), MAX_MEM - total)
        phys = k.alloc_pages(order)
        data = rng.randbytes(PAGE_SIZE << order)
        k.write(phys, data)
        csum = csum_partial(data, csum)
        info.append(phys | order)
        total += PAGE_SIZE << order
    array = np.array(info, np.uint64)
    vmalloc_form = rules(k).form == "vmalloc"
    stored: list[int] = []

    def notifier(kout: KhoOut) -> None:
        desc = kout.preserve_vmalloc(array.astype("<u8").tobytes()) if vmalloc_form else None
        for entry in info:
            kout.preserve_folio(entry & ~0xFFF, entry & 0xFFF)
        blob = khotest.encode(khotest.KhoTest(len(info), csum, None if desc else array, desc))
        stored[:] = [kout.store_again(blob, stored[0] if stored else None)]
        kout.add_subtree(khotest.KHO_TEST_SUBTREE, stored[0], len(blob))

    kout.publish(notifier)
    what = f"{len(info)} folios ({total >> 20} MiB)"
    k.printk(f"test_kho: {what} to preserve at KHO finalize, csum {csum:#x}"
             if kout.core.finalized_by_userspace else f"test_kho: preserved {what}, csum {csum:#x}")


def restore(k: Kernel, phys: int) -> str | None:
    """None on success, else why it failed."""
    assert k.kho_in is not None
    try:
        # either form: the matrix's cross-release cells test KHO, not test_kho's own format
        # change between 6.16 and 6.18 (each real release reads its own form only)
        t = khotest.decode(k.mem.read_fdt(phys, "kho_test FDT"))
    except AbiError as e:
        return str(e)
    info = t.folios_info
    if t.folios_vmalloc is not None:
        area = k.kho_in.restore_vmalloc(t.folios_vmalloc)
        if area is None:
            return "cannot restore the folios_info vmalloc area"
        raw = area.read(k.mem)
        for p in np.concatenate([area.chunk_phys, area.block_phys]).tolist():
            k.free_pages(p, 0 if p in area.chunk_phys else t.folios_vmalloc.order)
        if len(raw) < 8 * t.nr_folios:
            return f"folios_info holds {len(raw) // 8} entries, nr_folios is {t.nr_folios}"
        info = np.frombuffer(raw[: 8 * t.nr_folios], "<u8")
    assert info is not None
    csum = 0
    for entry in info.tolist():
        addr, order = entry & ~0xFFF, entry & 0xFFF
        got = k.kho_in.restore_folio(addr)
        if got is None:
            return f"cannot restore folio {addr:#x}"
        if got != order:
            return f"folio {addr:#x} has order {got}, expected {order}"
        csum = csum_partial(k.read(addr, PAGE_SIZE << order), csum)
        k.free_pages(addr, order)
    if csum != t.csum:
        return f"checksum {csum:#x} != {t.csum:#x}"
    return None


def device(k: Kernel) -> None:
    if rules(k).initcall == "device":
        _init(k)


def late(k: Kernel) -> None:
    if rules(k).initcall == "late":
        _init(k)


def _init(k: Kernel) -> None:
    """``kho_test_init``."""
    if k.kho_out is None:
        k.printk("test_kho: KHO is disabled")
        return
    try:
        phys = k.kho_in.retrieve_subtree(khotest.KHO_TEST_SUBTREE) if k.kho_in else None
    except LiveUpdateError:
        phys = None
    if phys is not None:
        why = restore(k, phys)
        if why is not None:
            k.printk(f"test_kho: KHO restore failed: {why}")
            return
        k.printk("KHO restore succeeded")
        if not rules(k).resave:
            return
    save(k)
