"""A test FLB (``luo_flb=1``, 7.1 images), as ``lib/tests/liveupdate.c`` attaches test FLBs to
every registered handler: one page of state shared by all preserved memfds, created by the
first preserve, dropped by the last unpreserve; the next kernel retrieves it with the first
retrieved (or finished) memfd and frees it when the last one is finished.

Which FLBs a release has is its rules' (:class:`liveupdate.kernel.luo.rules.Rules619`): 7.3's
``lib/tests/liveupdate.c`` registers three, ``liveupdate-test-flb-v0..2``, whose data is no
page but the value ``0xFEEDF00DCAFEBEE0 + i`` (``test_flb_preserve``), checked when the next
kernel retrieves it (``test_flb_retrieve``). Not modelled: 7.3 fetches the incoming FLBs
when the handler registers (``liveupdate_test_init``), not at the first retrieve."""

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


class ValueFlb:
    """7.3's test FLB: the data is a value, nothing is allocated or freed."""

    def __init__(self, k: Kernel, name: str, value: int) -> None:
        self.k, self.name, self.value = k, name, value

    def preserve(self) -> int:
        self.k.printk(f"liveupdate test: {self.name}: preserve was triggered")
        return self.value

    def unpreserve(self, data: int) -> None:
        self.k.printk(f"liveupdate test: {self.name}: unpreserve was triggered")

    def retrieve(self, data: int) -> None:
        if data == self.value:
            self.k.printk(f"liveupdate test: {self.name}: found flb data from the previous "
                          "boot")
        else:
            self.k.printk(f"liveupdate test: {self.name}: ERROR - incorrect data handle: "
                          f"{data:x}, expected {self.value:x}")

    def finish(self, data: int) -> None:
        self.k.printk(f"liveupdate test: {self.name}: finish was triggered")


def late(k: Kernel) -> None:
    luo = k.luo
    if not isinstance(luo, LuoSessions) or not luo.has_flb:
        k.printk("luo_flb: needs a 7.0+ image with LUO on")
        return
    base = luo.rules.test_flb_data
    for h in luo.handlers:
        for i, name in enumerate(luo.rules.test_flbs):
            luo.flbs.register(h.compatible, TestFlb(k) if base is None
                              else ValueFlb(k, name, base + i))
