"""Power transitions of the emulated kernel: panic, power off, restart.

Where Linux would ``panic()``, the kernel stops with the reason on the console and tells the
machine, which reports PANIC and can be power-cycled. Every path ends userspace first. An
in-process kernel (the test rig: no machine link) raises :class:`Halted` instead of exiting.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


class Halted(BaseException):
    """An in-process kernel stopped (panic, power off, restart); ``event`` as the machine
    would have received it."""

    def __init__(self, event: dict[str, object]) -> None:
        super().__init__(event.get("reason", event["op"]))
        self.event = event


def _end(k: Kernel, event: dict[str, object]) -> NoReturn:
    if k.userspace is not None:
        k.userspace.kill_all()
    if k.link is None:
        raise Halted(event)
    try:
        k.link.send(event)
    finally:
        os._exit(0)


def panic(k: Kernel, reason: str) -> NoReturn:
    k.printk(f"Kernel panic - not syncing: {reason}")
    k.printk("---[ end Kernel panic - not syncing: " + reason + " ]---")
    _end(k, {"op": "panic", "reason": reason})


def power_off(k: Kernel) -> NoReturn:
    k.printk("reboot: Power down")
    _end(k, {"op": "poweroff"})


def power_loss(k: Kernel, where: str) -> NoReturn:
    """The power goes: every process dies where it stands (no stop, no flush) and the machine
    comes back with a cold boot on fresh, zeroed RAM -- DRAM does not keep its contents."""
    k.printk(f"power loss ({where})")
    _end(k, {"op": "restart", "reason": f"power loss ({where})"})


def restart(k: Kernel) -> NoReturn:
    k.printk("reboot: Restarting system")
    _end(k, {"op": "restart"})
