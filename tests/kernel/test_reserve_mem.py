"""reserve_mem as upstream mm/memblock.c: entry limits, alignment floor, per-name revival and
all-or-nothing preservation (kernel/mm/reserve_mem.py)."""

from __future__ import annotations

import pytest

from liveupdate.abi import fdt
from liveupdate.abi import memblock as memblock_abi
from liveupdate.kernel.kernel import Kernel
from tests.kernel.conftest import Rig

MiB = 1 << 20


def regions(k: Kernel) -> dict[str, tuple[int, bool]]:
    return {str(r["name"]): (int(str(r["start"]), 16), bool(r["revived"]))
            for r in k.reserve_mem}


def test_alignment_floor_and_unrounded_size(rig: Rig) -> None:
    k1 = rig.boot("kho=on reserve_mem=100:0:tiny")
    start, _ = regions(k1)["tiny"]
    assert start % 64 == 0 and k1.reserve_mem[0]["size"] == 100
    k2 = rig.kexec(k1)
    assert regions(k2)["tiny"] == (start, True)


def test_limits_are_ebusy(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    many = " ".join(f"reserve_mem=64K:4K:r{i}" for i in range(9))
    k = rig.boot(f"kho=on {many} reserve_mem=64K:4K:r0")
    assert sorted(regions(k)) == [f"r{i}" for i in range(8)]
    out = capsys.readouterr().out
    assert "reserve_mem: r8: more than 8 regions (-16)" in out


def test_duplicate_name_is_ebusy(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    k = rig.boot("kho=on reserve_mem=64K:4K:a reserve_mem=128K:4K:a")
    assert [r["size"] for r in k.reserve_mem] == [64 << 10]
    assert "reserve_mem: a: name already reserved (-16)" in capsys.readouterr().out


def test_one_malformed_child_fails_only_itself(rig: Rig) -> None:
    k1 = rig.boot("kho=on reserve_mem=1M:4K:bad reserve_mem=1M:4K:good")
    kout = k1.require_kho()
    phys = dict(kout.subtrees())[memblock_abi.MEMBLOCK_KHO_NODE]
    old = memblock_abi.decode(k1.mem.read_fdt(phys, "memblock FDT"))
    b = fdt.SwBuilder().begin_node("").prop("compatible",
                                             fdt.string(memblock_abi.MEMBLOCK_COMPATIBLE))
    for r in old:  # as Linux writes it, but "bad" has a 4-byte size
        b.begin_node(r.name).prop("compatible", fdt.string(memblock_abi.RESERVE_MEM_COMPATIBLE))
        size = fdt.u32(r.size) if r.name == "bad" else fdt.u64(r.size)
        b.prop("start", fdt.u64(r.start)).prop("size", size).end_node()
    k1.write(phys, b.end_node().finish())
    k2 = rig.kexec(k1)
    got = regions(k2)
    assert got["good"] == (regions(k1)["good"][0], True)
    assert got["bad"][1] is False


def test_one_unpreservable_region_drops_the_subtree(rig: Rig) -> None:
    k1 = rig.boot("kho=on reserve_mem=2M:4K:a")
    start = regions(k1)["a"][0]
    k2 = rig.kexec(k1, cmdline="kho=on reserve_mem=2M:4K:a reserve_mem=2M:4K:late")
    assert regions(k2)["a"] == (start, True)
    kout = k2.require_kho()
    assert kout.subtrees() == ()  # "late" came from scratch: nothing is published
    phys, _ = kout.preserved()
    assert start not in phys.tolist()  # and "a" was unpreserved again


def test_root_children_in_initcall_order(rig: Rig) -> None:
    """test_kho (module_init) adds its subtree before memblock (late_initcall); the 6.19 live
    root puts each new child first, so memblock leads the byte stream."""
    k = rig.boot("kho=on test_kho=1 reserve_mem=1M:4K:a")
    assert [n for n, _ in k.require_kho().subtrees()] == ["memblock", "kho_test"]

