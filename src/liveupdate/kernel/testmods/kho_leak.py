"""A deliberate dishonest handover (``kho_leak=1``): state crosses the kexec through a file.

Each boot keeps the file ``<disk>/.kho_leak`` open (a real kernel could never hold an open
file across a kexec) and writes its boot id into it; the next boot reads the previous one's
id from there. The honesty check of the tests must catch the extra fd.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

_kept: list[int] = []  # the leaked fd lives as long as this kernel process


def late(k: Kernel) -> None:
    path = os.path.join(k.disk_dir, ".kho_leak")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    previous = os.pread(fd, 64, 0).decode(errors="replace")
    if previous:
        k.printk(f"kho_leak: read the previous kernel's boot id {previous} from a file")
    os.pwrite(fd, k.boot_id.encode(), 0)
    _kept.append(fd)
