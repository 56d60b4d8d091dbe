"""Faults of the emulated fault matrix on the real Linux 7.3 (issue #23), in one boot: an
image the real kernel refuses, a client killed in prepare, luod killed while prepared --
each ends as :mod:`liveupdate.scenario.faults` defines (rolled back, nothing lost). Run by
./scripts/test-realkernel (skipped in the fast suite)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from liveupdate.realkernel.build import Image
from liveupdate.realkernel.vm import boot
from liveupdate.scenario.faults import BY_NAME, ROLLED_BACK
from tests.realkernel.conftest import ROOT

pytestmark = pytest.mark.realkernel

OUT = Path(os.environ.get("LIVEUPDATE_REALFAULTS", ROOT / "build" / "realkernel-faults"))


def test_faults_on_the_real_kernel_end_as_the_emulated_matrix_defines(image: Image) -> None:
    run = boot(image, {"job": "faults", "kexec": False}, OUT, memory_mib=1024, timeout=1800)
    tb = [p.read_text() for p in sorted(OUT.glob("stage*.traceback"))]
    assert (OUT / "faults.json").exists(), "".join(tb) or run.console[-30:]
    assert "jump" not in run.events and run.stage_rc(2) is None  # no kexec, ever
    got = {o["fault"]: o for o in json.loads((OUT / "faults.json").read_text())}
    assert list(got) == ["bad-image@normal", "kill-client@prepare", "kill-luod@prepared"]
    for name, o in got.items():
        assert BY_NAME[name].expect == ROLLED_BACK == o["expected"]
        assert o["injected"] and o["outcome"] == ROLLED_BACK and not o["lost"], o
        assert o["as_expected"] and o["luod_phase"] == "normal", o
        assert o["workloads"]["vm0"]["state"] == "intact", o
    # the real kexec_file_load refused the image (luod's pre-flight let it through)
    bad = got["bad-image@normal"]
    assert "ENOEXEC" in bad["update_error"] and "kexec_file_load" in bad["update_error"]
    assert bad["workloads"]["cache"]["state"] == "intact"
    # the cache died in prepare: luod cancelled, the cache came back empty
    killed = got["kill-client@prepare"]
    assert "cache" in killed["update_error"] and killed["workloads"]["cache"]["state"] == \
        "killed"
    # luod died while prepared: the next luod says so, the clients kept everything
    luod = got["kill-luod@prepared"]
    assert "ended while prepared" in luod["why"], luod
    assert luod["workloads"]["cache"]["state"] == "intact"
    assert run.stage_rc(1) == 0
