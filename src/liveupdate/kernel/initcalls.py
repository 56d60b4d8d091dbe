"""The kernel's initcalls: the subsystems that register with others at boot, in one list, as
Linux's ``late_initcall``s do (``memfd_luo_init`` registers memfd's LUO handlers). The LUO core
learns its file handlers from here and never imports one; a new preservable file type (or FLB)
adds its init to this list beside its own code."""

from __future__ import annotations

from collections.abc import Callable

from liveupdate.kernel import vfio
from liveupdate.kernel.fs import memfd_luo

INITCALLS: tuple[Callable[[], None], ...] = (memfd_luo.init, vfio.luo_init)
_done = False


def run() -> None:
    """Once per process: in-process rigs boot several kernels in one interpreter, and a
    registration is the code's, not one boot's."""
    global _done
    if not _done:
        for call in INITCALLS:
            call()
        _done = True
