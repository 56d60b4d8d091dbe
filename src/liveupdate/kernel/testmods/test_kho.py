"""Port of lib/test_kho.c, 6.16 inline variant (spec/kho.md 7.1); ``test_kho=1``.

First boot: allocate folios of random orders until ``max_mem`` (8 MiB), fill them with random
bytes, checksum them, describe them in a ``kho-test-v1`` sub-FDT (inline ``folios_info`` of
``phys | order``) and preserve everything under the ``kho_test`` subtree. Next boot: check the
FDT, restore every folio requiring the recorded order, re-checksum, and print "KHO restore
succeeded". Unlike 6.16, a successful restore saves a fresh set, so chained kexecs verify every
hop. The checksum is a 32-bit ones'-complement sum of 16-bit words (csum_partial's arithmetic,
not bit-identical to x86's; both boots use this one).

Not yet 7.3's (a listed difference of the differential suite, docs/differential.md): Linux
7.3.4's test_kho runs at ``device_initcall`` (its subtree follows LUO's in the root), keeps
``folios_info`` in a 16-byte ``kho_vmalloc`` and either restores or saves.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import khotest
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SIZE, get_order
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.kho.outgoing import KhoOut

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

MAX_MEM = (PAGE_SIZE << MAX_PAGE_ORDER) * 2


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
    blob = khotest.encode(khotest.KhoTest(len(info), csum, np.array(info, np.uint64), None))
    stored: list[int] = []

    def notifier(kout: KhoOut) -> None:
        for entry in info:
            kout.preserve_folio(entry & ~0xFFF, entry & 0xFFF)
        stored[:] = [kout.store_again(blob, stored[0] if stored else None)]
        kout.add_subtree(khotest.KHO_TEST_SUBTREE, stored[0])

    kout.publish(notifier)
    what = f"{len(info)} folios ({total >> 20} MiB)"
    k.printk(f"test_kho: {what} to preserve at KHO finalize, csum {csum:#x}"
             if kout.core.finalized_by_userspace else f"test_kho: preserved {what}, csum {csum:#x}")


def restore(k: Kernel, phys: int) -> str | None:
    """None on success, else why it failed."""
    assert k.kho_in is not None
    try:
        t = khotest.decode(k.mem.read_fdt(phys, "kho_test FDT"), "inline")
    except AbiError as e:
        return str(e)
    assert t.folios_info is not None
    csum = 0
    for entry in t.folios_info.tolist():
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


def late(k: Kernel) -> None:
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
    save(k)
