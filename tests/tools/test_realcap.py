"""Every input form of luoctl inspect against captures of a real Linux 7.3 kernel under QEMU.

A capture directory holds the RAM at the jump as a raw image and as a dump-guest-memory ELF
core, the second kernel's sysfs setup_data, debugfs of both stages, and stage2.json: each
preserved memfd as the second kernel read it back. The captures are the small one kept in
tests/realkernel/captures/ (made whole by ``liveupdate.realkernel.fixture.unpack``: only the
pages the handover uses are real, the rest zero) and any full one under
``$LIVEUPDATE_REALCAP/<name>/`` (complete when ``DONE`` exists): ./scripts/test-realkernel
captures a fresh one from the real kernel and points this at it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from liveupdate.tools import report, report_debugfs
from tests.tools.cli import inspect, luoctl

FULL = os.environ.get("LIVEUPDATE_REALCAP")
KEPT = Path(__file__).resolve().parents[1] / "realkernel" / "captures"
CAPTURES = [*sorted(KEPT.glob("*/elf-head.bin")),
            *(sorted(Path(FULL).glob("*/DONE")) if FULL else [])]

pytestmark = pytest.mark.skipif(not CAPTURES, reason="no real-kernel capture")



@pytest.fixture(scope="module", params=CAPTURES,
                ids=[f"{c.parent.name}-{'kept' if c.name != 'DONE' else 'full'}"
                     for c in CAPTURES])
def cap(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    mark: Path = request.param
    if mark.name == "DONE":
        return mark.parent
    from liveupdate.realkernel import fixture

    whole = tmp_path_factory.mktemp(mark.parent.name)
    fixture.unpack(mark.parent, whole)
    for entry in mark.parent.iterdir():  # debugfs, setup_data, stage2.json as they are
        (whole / entry.name).symlink_to(entry)
    return whole


def _kho_sysfs(cap: Path) -> Path:
    (node,) = [d for d in (cap / "setup_data").iterdir()
               if int((d / "type").read_text(), 0) == 0xA]
    return node / "data"


@pytest.mark.parametrize("ram", ["ram.raw", "ram.elf"])
def test_ram_alone_extracts_what_the_second_kernel_read_back(cap: Path, ram: str,
                                                             tmp_path: Path) -> None:
    rc, rep, err = inspect("--ram", cap / ram, "--extract", tmp_path)
    assert rc == 0, err
    assert [c["phys"] for c in rep["candidates"]] == [rep["chosen"]]
    want = json.loads((cap / "stage2.json").read_text())
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert {(f["session"], f["token"]) for f in files} == {
        (s, t) for s, tokens in want.items() for t in tokens}
    for f in files:
        w = want[f["session"]][f["token"]]
        assert (f["size"], f["pos"], int(f["seals"], 16), f["sha256"]) == (
            w["size"], w["pos"], w["seals"], w["sha256"]), f
        data = (tmp_path / f["path"]).read_bytes()
        nonzero = [i for i in range(-(-len(data) // 4096)) if any(data[i * 4096:(i + 1) * 4096])]
        assert nonzero == w["nonzero_pages"] and f["data_pages"] == len(nonzero)


def test_every_setup_data_form_leads_to_the_same_root(cap: Path) -> None:
    rc, scanned, err = inspect("--ram", cap / "ram.raw")
    assert rc == 0, err
    for blob in (cap / "setup_data.payload", _kho_sysfs(cap)):
        for ram in ("ram.raw", "ram.elf"):
            rc, rep, err = inspect("--ram", cap / ram, blob)
            assert rc == 0, err
            assert rep["kho_data"]["fdt_addr"] == scanned["chosen"]
            assert rep["root"] == scanned["root"]
            _check_scratch(cap, rep["scratch"])
    for other in (cap / "setup_data").iterdir():
        if other / "data" != _kho_sysfs(cap):
            p = luoctl("inspect", other / "data")
            assert p.returncode == 1 and "is not SETUP_KEXEC_KHO" in p.stderr


def _check_scratch(cap: Path, scratch: dict[str, Any]) -> None:
    """QEMU is stopped a few ms after the guest prints "kexec_core: Starting new kernel",
    and the kexec copies its segments -- the scratch array among them -- after that: RAM
    holds either zeros there (the report's note says why) or, when the copy came first,
    the array the first kernel showed in debugfs out/scratch_phys and out/scratch_len."""
    areas = [(int(a["addr"], 16), a["size"]) for a in scratch["areas"]]
    if "note" in scratch:
        assert scratch["note"] == report.SCRATCH_EMPTY
        assert all(addr == 0 and size == 0 for addr, size in areas), areas
        return
    out = cap / "debugfs-stage1" / "out"
    phys, lens = ([int(v, 16) for v in (out / name).read_text().split()]
                  for name in ("scratch_phys", "scratch_len"))
    assert areas == list(zip(phys, lens, strict=True))


def test_debugfs_of_the_first_kernel(cap: Path) -> None:
    out = cap / "debugfs-stage1" / "out"
    rc, rep, err = inspect("--ram", cap / "ram.raw", out / "fdt")
    assert rc == 0, err
    assert rep["kind"] == "truncated-fdt" and rep["why"] == report_debugfs.TRUNCATED
    assert rep["bytes"] == (out / "fdt").stat().st_size < rep["header_totalsize"]
    rc, whole, err = inspect("--ram", cap / "ram.raw", cap / "debugfs-stage2" / "in" / "fdt")
    assert rc == 0, err
    names = [s["name"] for s in rep["root"]["subtrees"]]
    assert names == [s["name"] for s in whole["subtrees"]][: len(names)] and names
    assert rep["root"]["subtrees"] == whole["subtrees"][: len(names)]
    rc, luo, err = inspect(out / "sub_fdts" / "LUO")
    assert rc == 0, err
    assert luo["sessions_pa"] == "0x0" and luo["sessions_note"] == report_debugfs.NOT_SERIALIZED
    rc, md, err = inspect(out / "sub_fdts" / "kexec-metadata")
    assert rc == 0 and md["kind"] == "kexec-metadata", err


def test_debugfs_of_the_second_kernel(cap: Path) -> None:
    d = cap / "debugfs-stage2"
    rc, stale, _ = inspect(d / "in" / "sub_fdts" / "LUO")
    assert stale.get("note") in (report_debugfs.STALE_IN, report_debugfs.STALE_IN_INTACT)
    assert rc == (1 if stale["note"] == report_debugfs.STALE_IN else 0)
    rc, md_in, err = inspect(d / "in" / "sub_fdts" / "kexec-metadata")
    assert rc == 0, err
    rc, md_out, err = inspect(d / "out" / "sub_fdts" / "kexec-metadata")
    assert rc == 0, err
    assert md_out["kexec_count"] == md_in["kexec_count"] + 1
    rc, luo, err = inspect(d / "out" / "sub_fdts" / "LUO")
    assert rc == 0, err
    assert luo["sessions_note"] == report_debugfs.NOT_SERIALIZED
