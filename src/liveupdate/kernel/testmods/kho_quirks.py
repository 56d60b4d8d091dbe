"""Shape the handover as other Linux kernels legitimately do (``kho_quirks=KIND[+KIND]``), so
the next kernel must revive it: ``broken_child`` adds two root children no one retrieves -- one
whose ``fdt`` is 4 bytes, one without it (Linux only fails ``kho_retrieve_subtree`` for them);
``fdt_total`` / ``fdt_2page`` make the ``kho_data`` say the root FDT is its ``totalsize`` /
two pages long instead of one page (``kho_populate`` maps ``fdt_len`` bytes, whatever it is).
Runs after finalize, so it edits the bytes the next kernel will read (the setup segment
in its staged copy, which the jump writes out)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from liveupdate.abi import bootparams, fdt
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.kernel import kexec

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def reboot_notifier(k: Kernel) -> None:
    kout = k.require_kho()
    root = k.read(kout.root_phys, PAGE_SIZE)
    total = fdt.check_header(root).totalsize
    for kind in k.cmdline.get("kho_quirks").split("+"):
        if kind == "broken_child":
            tree = fdt.RwTree(root[:total], PAGE_SIZE)
            tree.add_subnode("/", "short")
            tree.setprop("/short", "fdt", b"\x00\x10\x00\x00")
            tree.add_subnode("/", "nofdt")
            tree.setprop("/nofdt", "compatible", fdt.string("nothing-v1"))
            root, total = tree.blob.ljust(PAGE_SIZE, b"\0"), len(tree.blob)
            k.write(kout.root_phys, root)
        elif kind in ("fdt_total", "fdt_2page") and k.kexec_image is not None:
            node = k.kexec_image.boot_params + kexec.SETUP_DATA_OFF + bootparams.SETUP_HDR_SIZE
            size = total if kind == "fdt_total" else 2 * PAGE_SIZE
            k.kexec_image.patch(node + 8, struct.pack("<Q", size))  # kho_data.fdt_size
        else:
            k.printk(f"kho_quirks: unknown kind {kind!r}")
            continue
        k.printk(f"kho_quirks: {kind}")
