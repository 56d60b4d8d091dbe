"""The reliability matrix: every fault of ``luoctl demo --fault`` at its phase point, on a
real emulated machine with luod, two VMs and the cache. Each cell must end in its defined
state with the fault demonstrably injected and no workload lost; each writes its observed
record, and the session renders docs/reliability.md from them (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from liveupdate.scenario.faults import FAULTS, Fault

pytestmark = pytest.mark.xdist_group("vms")  # busy guests: one worker (scripts/test)

SMALL = ["--vms", "1", "--vm-memory", "32M", "--machine-memory", "2G"]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_ends_in_its_defined_state(tmp_path: Path, fault: Fault) -> None:
    gen = fault.generation or "6.19"
    r = subprocess.run([sys.executable, "-m", "liveupdate.cli.luoctl", "demo", "--dir",
                        str(tmp_path / "m"), "--json", "--generation", gen, "--fault",
                        fault.name, *SMALL], capture_output=True, text=True, timeout=600)
    assert r.stdout, r.stderr[-3000:]
    got = json.loads(r.stdout)["fault"]
    records = os.environ.get("LIVEUPDATE_RELIABILITY_RECORDS")
    if records:
        Path(records).mkdir(parents=True, exist_ok=True)
        (Path(records) / f"{fault.name}.json").write_text(json.dumps(got, indent=1))
    assert got["injected"], got
    assert got["lost"] == [], got
    assert got["outcome"] == fault.expect, got
    assert r.returncode == 0 and got["as_expected"], got
    if got["outcome"] == "rolled back":  # luod says why (luoctl status shows it)
        assert got["why"] and got["luod_phase"] == "normal", got
