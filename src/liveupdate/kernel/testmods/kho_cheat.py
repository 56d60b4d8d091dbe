"""A deliberate cheat (``kho_cheat=1``): after a kexec it reads a page it never preserved.

First boot: write a marker into a page that is *not* preserved and record its address in a
preserved ``kho_cheat`` sub-FDT (the pointer is honest, the target is not). Next boot, before
the page allocator can reuse the page: read it. With the sanitizer on, it reads zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.abi import fdt
from liveupdate.errors import AbiError, LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

SUBTREE = "kho_cheat"
COMPAT = "kho-cheat-v1"
MARKER = b"KHO-CHEAT-MARKER"


def early(k: Kernel) -> None:
    if k.kho_in is None:
        return
    try:
        phys = k.kho_in.retrieve_subtree(SUBTREE)
        page = fdt.parse(k.mem.read_fdt(phys, "kho_cheat FDT")).root.u64("page", "kho_cheat")
        data = k.read(page, len(MARKER))
    except (LiveUpdateError, AbiError) as e:
        k.printk(f"kho_cheat: {e}")
        return
    if data == MARKER:
        k.printk(f"kho_cheat: unpreserved page {page:#x} still holds its data (not caught)")
    else:
        k.printk(f"kho_cheat: unpreserved page {page:#x} reads {data[:8].hex()}: caught")


def late(k: Kernel) -> None:
    kout = k.require_kho()
    page = k.alloc_pages(0)
    k.write(page, MARKER)
    blob = (fdt.SwBuilder().begin_node("").prop("compatible", fdt.string(COMPAT))
            .prop("page", fdt.u64(page)).end_node().finish())
    kout.add_subtree(SUBTREE, kout.store(blob))
    k.printk(f"kho_cheat: wrote a marker into unpreserved page {page:#x}")
