"""The demo's verdict on one VM, computed here -- by the checker, from the machine's RAM --
and not by the VMM that restored the memory.

The VMM says only where things lie (``where``: its guest memory's RAM extents, its saved
state's, and the registers its vCPU held right after the restore) and pauses its vCPU at an
exit. The checker then maps those RAM extents itself, read-only, from the machine's RAM
memfd (the host's view: the machine is our hardware) and runs
:func:`liveupdate.vmm.guest.verify` over every byte; it reads the saved vCPU state from the
preserved state memfd's RAM through the machine's debug port, decodes it
(:data:`liveupdate.vmm.vmstate.VM_STATE`) and compares it with the restored registers, and
hands the saved secret register to the memory check. A VMM that cold-starts its vCPU, that
throws its saved state away or that damages a byte of guest memory fails here, whatever it
says about itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from liveupdate.client.mapping import map_extents
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.vmm import verdict
from liveupdate.vmm.verdict import Verdict
from liveupdate.vmm.where import where as vmm_where

__all__ = ["Verdict", "check", "guest_memory", "judge"]

RAM_NAME = "/memfd:lu-ram"  # the machine's RAM memfd (liveupdate.machine.ram)


def _ram_fd(m: MachineClient) -> int | None:
    """The machine's RAM memfd, opened read-only through /proc (None where that is not
    allowed: the checker then reads through the debug port)."""
    pid = int(m.status()["machine_pid"])
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            if os.readlink(path).startswith(RAM_NAME):
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return None


@contextlib.contextmanager
def guest_memory(m: MachineClient, extents: list[tuple[int, int]]) -> Iterator[memoryview]:
    """The guest's memory as the machine's RAM holds it: mapped read-only (no copy), or read
    through the debug port when the RAM memfd cannot be opened."""
    fd = _ram_fd(m)
    if fd is None:
        yield memoryview(bytearray(b"".join(m.ram_read(p, n) for p, n in extents)))
        return
    try:
        mapping = map_extents(fd, extents, writable=False)
    finally:
        os.close(fd)
    try:
        yield mapping.view
    finally:
        mapping.close()


def judge(sock: str, where: dict[str, Any], saved: bytes | None,
          memory: Callable[[], AbstractContextManager[memoryview]]) -> Verdict:
    """The one verdict (:func:`liveupdate.vmm.verdict.judge`), the VMM paused at an exit
    and resumed through its control socket ``sock``: ``where`` is its answer, ``saved``
    the preserved state memfd's bytes (None: never restored), ``memory`` maps the guest's
    memory read-only."""
    def resume() -> None:
        ask(sock, "resume")

    return verdict.judge(where, saved, memory, lambda: bool(ask(sock, "pause")["held"]),
                         resume)


def check(m: MachineClient, sock: str) -> Verdict:
    """Judge the VM from the emulated machine's RAM: its memory mapped by extent, its saved
    state read through the debug port."""
    where = vmm_where(sock)
    ram = [(int(p), int(n)) for p, n in where["ram"]]
    state = [(int(p), int(n)) for p, n in where["state"]]
    saved = b"".join(m.ram_read(p, n) for p, n in state) if state else None
    return judge(sock, where, saved, lambda: guest_memory(m, ram))
