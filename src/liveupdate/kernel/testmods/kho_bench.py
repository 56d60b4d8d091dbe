"""``kho_bench=SIZE``: preserve SIZE of memory in order-10 folios for the kexec benchmark.

Only the first ``kho_bench_dirty`` (default 64M) is written, so the host-side footprint is
fixed whatever SIZE is. The next boot restores every folio, checks the dirty part's stamps and
frees them before preserving a fresh SIZE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import fdt
from liveupdate.abi.cmdline import size_option
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SIZE
from liveupdate.errors import AbiError, LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

SUBTREE = "kho_bench"
FOLIO = PAGE_SIZE << MAX_PAGE_ORDER


def _restore(k: Kernel) -> None:
    assert k.kho_in is not None
    try:
        phys = k.kho_in.retrieve_subtree(SUBTREE)
        node = fdt.parse(k.mem.read_fdt(phys, "kho_bench FDT", limit=1 << 26)).root
        folios = np.frombuffer(node.need("folios", "kho_bench"), "<u8")
        dirty = node.u64("dirty", "kho_bench")
    except (LiveUpdateError, AbiError) as e:
        k.printk(f"kho_bench: nothing to restore: {e}")
        return
    restored = k.kho_in.restore_folios(folios, MAX_PAGE_ORDER)
    bad = int((~restored).sum())
    for i, p in enumerate(folios[: dirty // FOLIO].tolist()):
        bad += k.read(p, 8) != p.to_bytes(8, "little") or not restored[i]
    for p in folios[restored].tolist():
        k.free_pages(p, MAX_PAGE_ORDER)  # folio_put: the next hop preserves afresh
    k.printk(f"kho_bench: restored {len(folios) - bad}/{len(folios)} folios")


def late(k: Kernel) -> None:
    if k.kho_in is not None:
        _restore(k)
    kout = k.require_kho()
    try:
        size = size_option(k.cmdline.get("kho_bench"), "kho_bench")
        dirty = size_option(k.cmdline.get("kho_bench_dirty", "64M"), "kho_bench_dirty")
        n = size // FOLIO
        folios = np.array([k.alloc_pages(MAX_PAGE_ORDER) for _ in range(n)], np.uint64)
    except LiveUpdateError as e:
        k.printk(f"kho_bench: {e.message}")
        return
    for i, p in enumerate(folios.tolist()):
        if i * FOLIO >= dirty:
            break
        k.write(p, p.to_bytes(8, "little") + bytes(FOLIO - 8))
    kout.preserve_blocks(folios, np.full(n, MAX_PAGE_ORDER, np.uint8))
    blob = (fdt.SwBuilder().begin_node("").prop("compatible", fdt.string("kho-bench-v1"))
            .prop("folios", folios.astype("<u8").tobytes()).prop("dirty", fdt.u64(dirty))
            .end_node().finish())
    kout.add_subtree(SUBTREE, kout.store(blob) if len(blob) <= FOLIO else 0)
    k.printk(f"kho_bench: preserved {n} folios ({size >> 20} MiB), dirtied {dirty >> 20} MiB")
