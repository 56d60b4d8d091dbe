"""init: start the userspace services listed on the machine's disk.

``<disk>/services`` holds one program per line (``shlex`` syntax; ``#`` comments). Each runs
as a real process with its own syscall connection; its output goes to the console.
"""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def start_services(k: Kernel) -> int:
    path = os.path.join(k.disk_dir, "services") if k.disk_dir else ""
    if not path or not os.path.exists(path):
        return 0
    started = 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                argv = shlex.split(line)
                proc = k.require_userspace().spawn(argv, cwd=k.disk_dir)
            except (OSError, ValueError) as e:
                k.printk(f"init: services line {n}: {e}")
                continue
            k.printk(f"init: started {argv[0]} (pid {proc.popen.pid})")
            started += 1
    return started
