"""Cut the power at a step of a live update (``power_loss=jump|boot|restore``): during the
reboot path before the jump (the reboot notifier step), during the next kernel's boot (a KHO
boot, once preserved memory is reserved), or at its first LUO file retrieve. The machine then
cold-boots on zeroed RAM; nothing preserved may come back, and nothing may come back wrong.
A cold boot never arms ``boot`` or ``restore`` again (they need a KHO boot), and ``jump``
needs another kexec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.kernel import power

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

STEPS = ("jump", "boot", "restore")


def _step(k: Kernel) -> str:
    step = str(k.cmdline.get("power_loss"))
    if step not in STEPS:
        k.printk(f"power_loss: {step!r} is not one of {', '.join(STEPS)}")
    return step


def reboot_notifier(k: Kernel) -> None:
    if _step(k) == "jump":
        power.power_loss(k, "during the reboot, before the jump")


def early(k: Kernel) -> None:
    if k.kho_in is not None and _step(k) == "boot":
        power.power_loss(k, "during the next kernel's boot")


def late(k: Kernel) -> None:
    if k.kho_in is not None and _step(k) == "restore":
        k.fault_points.setdefault("luo_retrieve", []).append(
            lambda k: power.power_loss(k, "during restore"))
