"""The real Linux 7.3 under QEMU: upstream's selftests pass in it, our harness runs commands
in it across a real kexec, and a capture of its handover decodes to exactly what its next
kernel got back. Run by ./scripts/test-realkernel (skipped in the fast suite)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from liveupdate.realkernel import build, capture, fixture, selftests
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.vm import boot
from tests.realkernel.conftest import ROOT

pytestmark = pytest.mark.realkernel

KEPT = Path(__file__).with_name("captures") / "linux-7.3.4-memfds"
# where the fresh capture goes: ./scripts/test-realkernel then runs tests/tools/test_realcap.py
# on it (LIVEUPDATE_REALCAP), every input form of luoctl inspect against the real kernel
REALCAP = Path(os.environ.get("LIVEUPDATE_REALCAP", ROOT / "build" / "realcap"))


def test_image_has_every_option_the_fragment_asks_for(image: Image) -> None:
    config = (image.root / "config").read_text()
    assert build.unmet(build.FRAGMENT.read_text(), config) == []
    assert image.release.startswith("7.3")
    assert image.manifest["debian_version"].startswith("7.3")


@pytest.mark.parametrize("test", build.SELFTESTS)
def test_upstream_selftest_passes(image: Image, test: str, tmp_path: Path) -> None:
    o = selftests.run_one(image, test, tmp_path)
    assert o.result.ok, f"{test}: {o.result.note or o.result.cases}"
    if test == "liveupdate":
        assert o.result.plan == len(o.result.cases) >= 15
        assert o.result.count("pass") == o.result.totals["pass"]


def test_command_runs_in_both_kernels_of_a_kexec(image: Image, tmp_path: Path) -> None:
    probe = ("import os, stat, json; st = os.stat('/dev/liveupdate'); "
             "print(json.dumps({'release': os.uname().release, "
             "'mode': stat.S_IMODE(st.st_mode), 'uid': st.st_uid, "
             "'cmdline': open('/proc/cmdline').read()}))")
    run = boot(image, {"job": "command", "argv": [".venv/bin/python", "-c", probe],
                       "kexec": True}, tmp_path)
    assert run.stage_rc(1) == 0 and run.stage_rc(2) == 0, run.console[-20:]
    first = json.loads((tmp_path / "command.stage1.out").read_text())
    second = json.loads((tmp_path / "command.stage2.out").read_text())
    assert first["release"] == second["release"] == image.release
    assert first["mode"] == 0o600 and first["uid"] == 0  # Linux: root only
    assert "lu_harness_stage" not in first["cmdline"]
    assert "lu_harness_stage=2" in second["cmdline"]
    # the jump happened between the stages, and the next kernel found KHO data
    assert run.events["stage1"] < run.events["jump"] < run.events["stage2"]
    assert any("KHO: found kexec handover data" in line for line in run.console)


def test_capture_is_what_the_next_kernel_got_back(image: Image, tmp_path: Path) -> None:
    """The scenario's memfds cross a real kexec unchanged; the capture packs to the small
    form and back to the pages the handover uses; and the kept capture in the repository is
    the same handover this kernel writes today (same files, same contents)."""
    out = REALCAP / f"linux-{image.release}-memfds"
    (out.parent).mkdir(parents=True, exist_ok=True)
    (out / "DONE").unlink(missing_ok=True)
    info = capture.capture(image, out, append="test_kho.max_mem=65536")
    ev = info["events"]
    assert ev["stage1"] < ev["jump"] < ev["stage2"]
    first = json.loads((out / "stage1.json").read_text())
    second = json.loads((out / "stage2.json").read_text())
    assert first == second and sum(len(f) for f in second.values()) == 4
    kept = json.loads((KEPT / "stage2.json").read_text())
    assert second == kept
    index = fixture.pack(out, tmp_path / "small")
    raw, elf = fixture.unpack(tmp_path / "small", tmp_path / "whole")
    pages = fixture.handover_pages(raw, (out / "setup_data.payload").read_bytes())
    assert pages == {p for first_page, n in index["extents"]
                     for p in range(first_page, first_page + n)}
    assert elf.stat().st_size == (out / "ram.elf").stat().st_size
    (out / "DONE").write_text(image.release + "\n")
