"""Every decoder fed hostile input raises AbiError -- never another exception, a segfault or
a hang. Each decoder is fuzzed in its own process (fuzz_runner.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.abi.fuzz_runner import DECODERS, SEGFAULT_BLOB

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("LIVEUPDATE_FUZZ_EXAMPLES", "300"))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_survives_hostile_input(name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.abi.fuzz_runner", name, str(EXAMPLES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{name}: exit {proc.returncode}"
        + (" (killed by a signal: segfault?)" if proc.returncode < 0 else "")
        + f"\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def test_libfdt_segfault_blob_is_refused_before_libfdt() -> None:
    code = ("from liveupdate.abi import fdt\n"
            "from liveupdate.errors import AbiError\n"
            f"blob = {SEGFAULT_BLOB!r}\n"
            "try:\n    fdt.parse(blob)\nexcept AbiError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "exceeds the" in proc.stdout
