"""Issue #21: the layering of ARCHITECTURE.md is a contract (``.importlinter``) that
``./scripts/test`` checks with import-linter. Here: the contract really fails when someone
imports upward -- on a copy of the tree with one planted import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(src: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the package found in ``src`` (ahead of the editable install)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / ".importlinter")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tree") / "src"
    shutil.copytree(ROOT / "src" / "liveupdate", src / "liveupdate",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_the_tree_keeps_the_contract(tree: Path) -> None:
    r = lint(tree)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("module", "planted", "contract"), [
    ("abi/consts.py", "import liveupdate.kernel.kernel", "abi imports no other layer"),
    ("kernel/link.py", "import liveupdate.luod", "kernel and machine never import upward"),
    ("luod/__init__.py", "import liveupdate.kernel.cmdline", "userspace never imports"),
    ("tools/inspect.py", "import liveupdate.machine.client", "tools are reports built on abi"),
])
def test_a_planted_upward_import_breaks_it(tree: Path, tmp_path: Path, module: str,
                                           planted: str, contract: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    target = src / "liveupdate" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted\n")
    r = lint(src)
    assert r.returncode != 0
    broken = [line for line in r.stdout.splitlines() if "BROKEN" in line]
    assert any(contract in line for line in broken), r.stdout
