"""A LUO subsystem that fails once (``luo_fail=prepare`` or ``luo_fail=freeze``, v3 images),
as the v3 self-test ``subsystem.prepare_fail`` does, to prove the rollback: a failed PREPARE
leaves NORMAL with every file unprepared; a failed freeze makes ``reboot()`` fail with the
errno, cancels everything and the kernel keeps running. The second attempt succeeds."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.luo.v3 import LuoV3

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


class FailOnce:
    name = "luo_fail"

    def __init__(self, k: Kernel, step: str) -> None:
        self.k = k
        self.step = step

    def _maybe_fail(self, step: str) -> None:
        if step == self.step:
            self.step = ""
            self.k.printk(f"luo_fail: failing {step} once")
            raise LiveUpdateError(err=errno.EIO, msg=f"luo_fail: injected {step} failure")

    def prepare(self) -> int:
        self._maybe_fail("prepare")
        return 0

    def freeze(self, data: int) -> int:
        self._maybe_fail("freeze")
        return data

    def cancel(self, data: int) -> None:
        self.k.printk("luo_fail: cancel")

    def finish(self, data: int) -> None:
        """Nothing was preserved."""


def late(k: Kernel) -> None:
    step = k.cmdline.get("luo_fail")
    if not isinstance(k.luo, LuoV3) or step not in ("prepare", "freeze"):
        k.printk(f"luo_fail: needs LUO v3 and prepare|freeze, not {step!r}")
        return
    k.luo.subsystems.register(FailOnce(k, step))
