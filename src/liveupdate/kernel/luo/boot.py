"""Bring LUO up at boot: on when the command line says ``liveupdate=on`` (``kstrtobool``, as
every generation's ``early_param("liveupdate")``) and KHO is enabled, with the front end, the
handover writer, the rules and the registered file handlers of the image's LUO generation
row (``k.gen.luo``: :data:`liveupdate.abi.generations.LUO`); then restore what the previous kernel
preserved."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from liveupdate.abi.generations import LuoGeneration
from liveupdate.kernel import negotiate
from liveupdate.kernel.luo import session_incoming
from liveupdate.kernel.luo.handler import FileHandler, handlers_for
from liveupdate.kernel.luo.rules import rules_of
from liveupdate.kernel.luo.session import LuoSessions
from liveupdate.kernel.luo.v3 import LuoV3

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

FrontEnd = Callable[["Kernel", LuoGeneration, list[FileHandler], dict[str, tuple[str, ...]]],
                    LuoV3 | LuoSessions]
FRONTENDS: dict[str, FrontEnd] = {"v3": LuoV3, "sessions": LuoSessions}


def init(k: Kernel) -> None:
    gen = k.gen.luo
    if not k.cmdline.flag("liveupdate"):
        _read_only(k, gen)
        return
    if not gen.enabled:  # before 6.19 there is no LUO to turn on
        k.printk("luo: this kernel has no Live Update Orchestrator; liveupdate= ignored")
        return
    if k.kho_out is None:
        k.printk("luo: KHO is disabled; LUO is disabled")
        return
    reads = negotiate.code_reads(k)
    luo = FRONTENDS[gen.frontend](k, gen, handlers_for(k, k.image.native(), reads), reads)
    k.luo = luo
    luo.boot()
    k.printk(luo.enabled_message())


def _read_only(k: Kernel, gen: LuoGeneration) -> None:
    """``liveupdate=off``: where the rules say so (7.3.4), ``luo_early_startup`` still reads
    the previous kernel's LUO data -- a damaged one panics -- but no outgoing state, no
    device: the preserved files stay reserved and unreachable."""
    if k.kho_in is None or not rules_of(gen).parses_incoming_when_off:
        return
    reads = negotiate.code_reads(k)
    luo = LuoSessions(k, gen, handlers_for(k, k.image.native(), reads), reads)
    luo.read_incoming()
    session_incoming.free_ser(luo)
