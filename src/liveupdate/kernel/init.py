"""init: start the userspace services listed on the machine's disk.

``<disk>/services`` holds one program per line (``shlex`` syntax; ``#`` comments). Each runs
as a real process with its own syscall connection; its output goes to the console. A line
that starts with ``@restart`` is restarted whenever it exits (systemd's ``Restart=always``),
unless it failed :data:`BURST` times within :data:`BURST_SECONDS` -- then init gives up and
says so, rather than spin.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

RESTART = "@restart"
BURST, BURST_SECONDS = 5, 10.0


def _spawn(k: Kernel, argv: list[str]) -> int:
    proc = k.require_userspace().spawn(argv, cwd=k.disk_dir)
    k.printk(f"init: started {argv[0]} (pid {proc.popen.pid})")
    return proc.popen.pid


def _supervise(k: Kernel, argv: list[str]) -> None:
    """Restart ``argv`` whenever it exits, until the kernel goes down."""
    starts: list[float] = []
    us = k.require_userspace()
    while not us.dying:
        starts = [t for t in starts if time.monotonic() - t < BURST_SECONDS]
        if len(starts) >= BURST:
            k.printk(f"init: {argv[0]} failed {BURST} times in {BURST_SECONDS:.0f}s; "
                     "not restarting it")
            return
        starts.append(time.monotonic())
        try:
            pid = _spawn(k, argv)
        except OSError as e:
            k.printk(f"init: {argv[0]}: {e}")
            return
        status = us.wait(pid)
        if not us.dying:
            k.printk(f"init: {argv[0]} (pid {pid}) exited with status {status}; restarting")


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
                restart = argv[:1] == [RESTART]
                argv = argv[1:] if restart else argv
                if not argv:
                    raise ValueError("no program")
                if restart:
                    threading.Thread(target=_supervise, args=(k, argv), daemon=True).start()
                else:
                    _spawn(k, argv)
            except (OSError, ValueError) as e:
                k.printk(f"init: services line {n}: {e}")
                continue
            started += 1
    return started
