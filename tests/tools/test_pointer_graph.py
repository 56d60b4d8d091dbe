"""Crafted pointer graphs cost one description per blob: a report describes each blob address
once (a second pointer is a reference to the first, a pointer back into the blobs being
described is ELOOP), within a budget, and a RAM scan examines a bounded number of roots."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from liveupdate.abi import kho
from liveupdate.abi.physmem import PhysMem
from liveupdate.tools import report, report_ram, report_walk
from tests.tools.cli import inspect

ROOT = 0x4000


def _root(subtrees: list[tuple[str, int]]) -> bytes:
    r = kho.LiveRoot(kho.KHO_FDT_COMPATIBLE, 0)  # no memory map: it decodes, empty
    for name, phys in subtrees:
        r.add_subtree(name, phys)
    return r.blob


def _ram(blobs: dict[int, bytes], pages: int = 64) -> bytearray:
    ram = bytearray(pages * 4096)
    for phys, blob in blobs.items():
        ram[phys : phys + len(blob)] = blob
    return ram


def _self_loop(k: int) -> bytearray:
    """A root whose k subtrees all point back at the root: k^8 descriptions before."""
    return _ram({ROOT: _root([(f"s{i}", ROOT) for i in range(k)])})


def _kinds(rep: Any) -> list[str]:
    if isinstance(rep, dict):
        return [*([rep["kind"]] if "kind" in rep else []),
                *(k for v in rep.values() for k in _kinds(v))]
    if isinstance(rep, list):
        return [k for v in rep for k in _kinds(v)]
    return []


@pytest.mark.parametrize("k", [5, 6, 7, 8])
def test_subtrees_pointing_back_at_their_root_are_each_one_eloop(k: int) -> None:
    rep, _ = report_ram.describe_ram(PhysMem(_self_loop(k)), None)
    subs = rep["root"]["subtrees"]
    assert len(subs) == k
    for sub in subs:
        assert sub["content"].keys() == {"error"}
        assert (f"subtree {sub['name']} at {ROOT:#x} points back at the KHO root"
                in sub["content"]["error"])
        assert "ELOOP" in sub["content"]["error"]
    assert _kinds(rep["root"]) == ["kho-root"] and len(report.errors(rep)) == k
    assert len(json.dumps(rep)) < 1000 + 300 * k


@pytest.mark.parametrize("k", [5, 8])
def test_a_root_of_unknown_address_is_described_twice_at_most(k: int) -> None:
    """FILE is the root blob itself: its address is not known, so its first subtree
    describes it once more; every other pointer to it is a reference."""
    ram = _self_loop(k)
    rep = report.describe(bytes(ram[ROOT : ROOT + 4096]), PhysMem(ram))
    (name, first), *rest = ((s["name"], s["content"]) for s in rep["subtrees"])
    assert first["kind"] == "kho-root" and len(first["subtrees"]) == k
    assert all("ELOOP" in s["content"]["error"] for s in first["subtrees"])
    assert [c for _, c in rest] == [
        {"kind": "reference", "phys": hex(ROOT), "same_as": f"subtree {name}",
         "note": "described once, where it was first pointed at"}] * (k - 1)
    assert _kinds(rep).count("kho-root") == 2 and len(json.dumps(rep)) < 1000 + 500 * k


def test_the_command_answers_at_once_for_eight_self_references(tmp_path: Path) -> None:
    ram = _self_loop(8)
    (tmp_path / "ram").write_bytes(ram)
    (tmp_path / "root").write_bytes(ram[ROOT : ROOT + 4096])
    for args in (["--ram", tmp_path / "ram"], ["--ram", tmp_path / "ram", tmp_path / "root"]):
        rc, rep, err = inspect(*args)
        assert rc == 1 and "points back at" in err and "Traceback" not in err
        assert len(json.dumps(rep)) < 10_000


def test_two_subtrees_sharing_a_blob_give_one_description_and_a_reference() -> None:
    ram = _ram({ROOT: _root([("a", 0x6000), ("b", 0x6000)]), 0x6000: _root([])})
    rep, _ = report_ram.describe_ram(PhysMem(ram), None)
    first, second = rep["root"]["subtrees"]
    assert first["content"]["kind"] == "kho-root" and second["content"]["kind"] == "reference"
    assert second["content"]["same_as"] == f"subtree {first['name']}"
    assert report.errors(rep) == []


def test_a_chain_of_distinct_blobs_stops_at_the_depth_bound() -> None:
    pages = [ROOT + 0x1000 * i for i in range(12)]
    ram = _ram({p: _root([("next", q)]) for p, q in pairwise(pages)})
    rep = report.describe_root(bytes(ram[ROOT : ROOT + 4096]), PhysMem(ram), at=ROOT)
    (err,) = report.errors(rep)
    assert f"nest deeper than {report_walk.MAX_DEPTH}" in err and "ELOOP" in err


def test_past_the_blob_budget_what_is_left_is_e2big(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_walk, "MAX_BLOBS", 3)
    subs = [(f"s{i}", 0x6000 + 0x1000 * i) for i in range(5)]
    ram = _ram({ROOT: _root(subs), **{p: _root([]) for _, p in subs}})
    rep = report.describe_root(bytes(ram[ROOT : ROOT + 4096]), PhysMem(ram), at=ROOT)
    contents = [s["content"] for s in rep["subtrees"]]
    assert [c.get("kind") for c in contents] == ["kho-root", "kho-root", None, None, None]
    assert all("bound of 3 blobs described" in c["error"] and "E2BIG" in c["error"]
               for c in contents[2:])
    # a RAM scan shares one budget among its candidates: those it could not describe
    # at all are rejected, never chosen
    scan, _ = report_ram.describe_ram(PhysMem(ram), None)
    assert scan["chosen"] == hex(ROOT)
    assert all("not described" in c["rejected"] for c in scan["candidates"][1:])


def test_past_the_read_budget_reads_fail_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    subs = [(f"s{i}", 0x6000 + 0x1000 * i) for i in range(5)]
    monkeypatch.setattr(report_walk, "MAX_READ", 2 * (8 + len(_root([]))))  # two subtrees
    ram = _ram({ROOT: _root(subs), **{p: _root([]) for _, p in subs}})
    rep = report.describe_root(bytes(ram[ROOT : ROOT + 4096]), PhysMem(ram), at=ROOT)
    errs = report.errors(rep)
    assert errs and all("bytes read from RAM" in e and "E2BIG" in e for e in errs)
    assert rep["subtrees"][0]["content"]["kind"] == "kho-root"


def test_a_ram_scan_examines_a_bounded_number_of_roots() -> None:
    n = report_ram.MAX_CANDIDATES + 4
    ram = _ram({0x1000 * i: _root([]) for i in range(1, n + 1)}, pages=n + 2)
    rep, root = report_ram.describe_ram(PhysMem(ram), None)
    assert root is not None and rep["chosen"] == "0x1000"
    assert len(rep["candidates"]) == report_ram.MAX_CANDIDATES
    left = rep["not_examined"]
    assert left["count"] == 4 and left["list"][0] == hex(0x1000 * (n - 3))
    assert "E2BIG" in left["error"] and "--root ADDR" in left["error"]


def test_a_ram_scan_parses_a_bounded_amount_of_fdt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_ram, "SCAN_FDT_BYTES", 1)
    ram = _ram({0x1000: _root([]), 0x2000: _root([])})
    rep, _ = report_ram.describe_ram(PhysMem(ram), None)
    assert [c["phys"] for c in rep["candidates"]] == ["0x1000"]
    assert rep["not_examined"]["count"] == 1
