"""``test_panic=REASON``: panic at the end of boot, to exercise the machine's PANIC state."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def late(k: Kernel) -> None:
    k.panic(f"test_panic: {k.cmdline.get('test_panic')}")
