"""Bring LUO up at boot: on when the command line says ``liveupdate=on`` (``kstrtobool``, as
every generation's ``early_param("liveupdate")``) and KHO is enabled, with the front end of
the image's uAPI generation; then restore what the previous kernel preserved."""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.abi.uapi import Gen
from liveupdate.kernel.luo.session import LuoSessions
from liveupdate.kernel.luo.v3 import LuoV3

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def init(k: Kernel) -> None:
    if not k.cmdline.flag("liveupdate"):
        return
    if k.image.luo == "none":  # before 6.19 there is no LUO to turn on
        k.printk("luo: this kernel has no Live Update Orchestrator; liveupdate= ignored")
        return
    if k.kho_out is None:
        k.printk("luo: KHO is disabled; LUO is disabled")
        return
    if k.image.luo == "v3":
        v3 = LuoV3(k)
        k.luo = v3
        v3.boot()
        k.printk(f"luo: LUO v3 enabled, state {v3.state.name.lower()}")
        return
    sessions = LuoSessions(k, Gen.V7_1 if k.image.luo in ("7.1", "7.2") else Gen.V6_19)
    k.luo = sessions
    sessions.boot()
    k.printk(f"luo: LUO {k.image.luo} enabled (sessions), live update {sessions.number}")
