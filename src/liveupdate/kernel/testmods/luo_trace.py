"""A LUO subsystem with real data (``luo_trace=1``, v3 images): a one-page trace buffer whose
contents survive the live update, carried as the subsystem's u64 (the page's address).

Each boot logs into a fresh page. PREPARE preserves the page and logs "prepare"; the reboot's
freeze logs "freeze"; CANCEL logs "cancel" and unpreserves it. The next kernel, registering
in UPDATED, fetches the address with ``liveupdate_get_subsystem_data``, restores the page,
prints what the previous kernel logged, and frees it at FINISH.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.uapi import State
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.luo.v3 import LuoV3

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


class TraceBuffer:
    name = "luo_trace"

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.page = k.alloc_pages(0)
        k.zero(self.page, PAGE_SIZE)
        self.text = b""
        self.previous = 0  # the previous kernel's page, restored, freed at FINISH

    def log(self, line: str) -> None:
        self.text = (self.text + line.encode() + b"\n")[-PAGE_SIZE:]
        self.k.write(self.page, self.text)

    def prepare(self) -> int:
        self.k.require_kho().preserve_folio(self.page, 0)
        self.log("prepare")
        return self.page

    def freeze(self, data: int) -> int:
        self.log("freeze")
        return data

    def cancel(self, data: int) -> None:
        self.log("cancel")
        self.k.require_kho().unpreserve_folio(self.page, 0)

    def finish(self, data: int) -> None:
        if self.previous:
            self.k.free_pages(self.previous, 0)
            self.previous = 0
            self.log("finish: freed the previous kernel's page")


def late(k: Kernel) -> None:
    luo = k.luo
    if not isinstance(luo, LuoV3):  # the subsystem API is v3's; FLB replaced it
        k.printk("luo_trace: LUO v3 is not enabled")
        return
    buf = TraceBuffer(k)
    buf.log(f"boot {k.boot_id}")
    if luo.state is State.UPDATED:
        try:
            data = luo.subsystems.get_data(TraceBuffer.name)
        except LiveUpdateError:
            k.printk("luo_trace: no trace from the previous kernel")
        else:
            kin = k.kho_in
            if kin is not None and kin.restore_folio(data) == 0:
                previous = k.read(data, PAGE_SIZE).rstrip(b"\0").decode(errors="replace")
                k.printk("luo_trace: the previous kernel logged: "
                         + "; ".join(previous.splitlines()))
                buf.previous = data
            else:
                k.printk(f"luo_trace: {data:#x} is not a preserved page")
    luo.subsystems.register(buf)
