"""Guests on hugetlb pages across a live update of 7.3+posted (a real machine, real
processes): the VMM's guest memfd is MFD_HUGETLB, its memory lies on 2 MiB-aligned folios of
the pool, the handover carries it as huge-memfd-v1, and the next kernel's VMM maps the very
same physical folios; every guest byte checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveupdate.scenario.demo import Demo
from liveupdate.scenario.witness import guest_memory

pytestmark = pytest.mark.xdist_group("vms")  # busy guests: one worker (scripts/test)
MiB = 1 << 20


def test_a_guest_on_2m_pages_keeps_its_folios(tmp_path: Path) -> None:
    d = Demo(str(tmp_path / "m"), 1, 64 * MiB, 1 << 30, "7.3+posted", "tcg", False,
             lambda msg: None, hugepages="2M")
    try:
        d.boot()
        assert d.m is not None
        assert d.m.wait("HugeTLB: registered 2 MiB page size, pre-allocated 32 pages",
                        timeout=5)
        r = d.update(1, "none")
    finally:
        d.close()
    vm = r.vms["vm0"]
    assert vm.integrity and vm.resumed and vm.zero_copy_problem == "", vm
    assert r.handover["formats"]["huge-memfd"] == "huge-memfd-v1"
    _, (before,) = guest_memory(d.maps_before, "vm0", 64 * MiB)
    _, (after,) = guest_memory(d.maps_after, "vm0", 64 * MiB)
    assert after == before
    assert all(a % (2 * MiB) == 0 and n % (2 * MiB) == 0 for a, n in before)
