"""Damage the handover after KHO finalize (``kho_corrupt=KIND``), so the next kernel must
refuse it: ``root_fdt``, ``compatible``, ``map_outside_ram``, ``chunk_loop``, ``num_elms``,
``bitmap_outside_ram``; on kho-v3+ kernels ``radix_loop`` (a radix node points back at the
root) and ``radix_outside_ram``; ``luo_compatible`` (the LUO FDT, or 7.2's ``luo_ser``,
claims ``luo-v9``: the next kernel must panic, as ``luo_restore_fail`` does)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def reboot_notifier(k: Kernel) -> None:
    kind = k.cmdline.get("kho_corrupt")
    kout = k.require_kho()
    root, first = kout.root_phys, kout.mem_map
    if kind == "root_fdt":
        k.write(root + 4, struct.pack(">I", 0x7FFFFFFF))  # a lying totalsize
    elif kind == "compatible":
        blob = k.read(root, 4096)
        k.write(root, blob.replace(kout.root.compatible.encode() + b"\0", b"kho-v9\0"))
    elif kind == "map_outside_ram":
        kout.root.set_mem_map(k.ram_size + 0x10000)
        k.write(root, kout.root.blob)
    elif kind == "chunk_loop":
        k.write(first, struct.pack("<Q", first))
    elif kind == "num_elms":
        k.write(first + 12, struct.pack("<I", 256))
    elif kind == "luo_compatible":
        luo = dict(kout.subtrees()).get("LUO")
        if luo is None:
            k.printk("kho_corrupt: no LUO subtree to damage")
            return
        head = k.read(luo, 4096)
        old = b"luo-v5\0" if head.startswith(b"luo-v5\0") else b"luo-v1\0"
        k.write(luo, head.replace(old, b"luo-v9\0", 1))
    elif kind in ("radix_loop", "radix_outside_ram"):
        if kout.radix is None:
            k.printk("kho_corrupt: no radix tree on this kernel")
            return
        # root slot 4 is never used by a real key (orders >= 2 live under slot 0)
        target = kout.radix.root if kind == "radix_loop" else k.ram_size + 0x10000
        k.write(kout.radix.root + 4 * 8, struct.pack("<Q", target))
    elif kind == "bitmap_outside_ram":
        k.write(first + 16 + 8, struct.pack("<Q", k.ram_size + 0x20000))
    else:
        k.printk(f"kho_corrupt: unknown kind {kind!r}")
        return
    k.printk(f"kho_corrupt: damaged the handover ({kind})")
