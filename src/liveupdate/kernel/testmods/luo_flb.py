"""A test FLB (``luo_flb=1``, 7.1 images), as ``lib/tests/liveupdate.c`` attaches test FLBs to
every registered handler: one page of state shared by all preserved memfds, created by the
first preserve, dropped by the last unpreserve; the next kernel retrieves it with the first
retrieved (or finished) memfd and frees it when the last one is finished.

Not yet 7.3's (a listed difference of the differential suite, docs/differential.md): Linux
7.3.4's ``lib/tests/liveupdate.c`` registers three FLBs, ``liveupdate-test-flb-v0..2`` with
data ``0xFEEDF00DCAFEBEE0 + i``, fetched when the handler registers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.kernel.luo.session import LuoSessions

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

NAME = "test-flb-v1"


class TestFlb:
    name = NAME

    def __init__(self, k: Kernel) -> None:
        self.k = k

    def preserve(self) -> int:
        phys = self.k.require_kho().store(f"flb from boot {self.k.boot_id}".encode())
        self.k.printk(f"luo_flb: preserve: state at {phys:#x}")
        return phys

    def unpreserve(self, data: int) -> None:
        self.k.require_kho().unpreserve_free(data, PAGE_SIZE)
        self.k.printk("luo_flb: unpreserve: the last file is gone")

    def retrieve(self, data: int) -> None:
        kin = self.k.kho_in
        if kin is None or kin.restore_folio(data) != 0:
            self.k.printk(f"luo_flb: retrieve: {data:#x} was not preserved")
            return
        text = self.k.read(data, 64).rstrip(b"\0").decode(errors="replace")
        self.k.printk(f"luo_flb: retrieve: {text}")

    def finish(self, data: int) -> None:
        self.k.free_pages(data, 0)
        self.k.printk("luo_flb: finish: state freed")


def late(k: Kernel) -> None:
    luo = k.luo
    if not isinstance(luo, LuoSessions) or not luo.has_flb:
        k.printk("luo_flb: needs a 7.0+ image with LUO on")
        return
    for h in luo.handlers:
        luo.flbs.register(h.compatible, TestFlb(k))
