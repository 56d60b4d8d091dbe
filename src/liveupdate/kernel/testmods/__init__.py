"""Kernel-side test components, enabled from the command line like test modules.

Each module may define ``early(k)`` (a KHO boot, after preserved memory is reserved and before
the page allocator takes free memory), ``device(k)`` (``device_initcall``: after ``kho_init``,
before LUO), ``late(k)`` (``late_initcall``, after LUO) and ``reboot_notifier(k)``
(the reboot path's notifier step, after KHO finalize; see ``kernel/reboot.py``). ``PARAMS``
maps the command-line switch to the module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

PARAMS = {
    "test_kho": "test_kho",
    "kho_cheat": "kho_cheat",
    "kho_leak": "kho_leak",
    "kho_disk": "kho_disk",
    "luo_trace": "luo_trace",
    "luo_fail": "luo_fail",
    "luo_flb": "luo_flb",
    "kho_corrupt": "kho_corrupt",
    "kho_quirks": "kho_quirks",
    "kho_bench": "kho_bench",
    "test_panic": "test_panic",
    "power_loss": "power_loss",
    "test_nic": "test_nic",
}


def enabled(k: Kernel) -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{mod}")
            for param, mod in PARAMS.items() if k.cmdline.get(param, "0") not in ("", "0")]


def run(k: Kernel, hook: str) -> None:
    for mod in enabled(k):
        fn = getattr(mod, hook, None)
        if fn is not None:
            fn(k)
