"""./scripts/test relies on ``--dist loadgroup`` to keep the busy-guest tests (xdist_group
"vms") on one worker. pytest 9.2 silently broke that (pytest-xdist#1386: the group suffix
of the node id no longer takes), and nothing failed -- the suite only got slower and its
guests competed. This checks the pinned pair still groups."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = '''
import os, pytest

@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    print("worker", os.environ["PYTEST_XDIST_WORKER"])

def test_alone():
    pass
'''


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_probe.py").write_text(PROBE)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "3",
                        "--dist", "loadgroup", "-v", "-rA", "test_probe.py"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    workers = {line.split()[0] for line in r.stdout.splitlines()
               if "PASSED" in line and "test_grouped" in line and line.startswith("[gw")}
    assert len(workers) == 1, r.stdout[-2000:]
