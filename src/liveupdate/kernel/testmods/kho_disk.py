"""A deliberate dishonest handover (``kho_disk=1``): a value crosses the kexec through a file
on the disk, opened and closed at boot -- no fd is held, so the fd-based honesty test sees
nothing. The kernel's filesystem audit (:mod:`liveupdate.kernel.fsaudit`) must panic at the
open, naming the file.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def late(k: Kernel) -> None:
    path = os.path.join(k.disk_dir, ".kho_disk")
    try:
        with open(path) as f:
            k.printk(f"kho_disk: read the previous kernel's boot id {f.read()} from a file")
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(k.boot_id)
