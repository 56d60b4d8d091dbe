"""Every decoder fed hostile input raises AbiError -- never another exception, a segfault or
a hang. The decoders are fuzzed in a process of their own (fuzz_runner.py), all in one (one
start-up, not thirty); a decoder that kills that process is found by running the ones that
did not finish one per process."""

import os
import subprocess
import sys
from pathlib import Path

from tests.abi.fuzz_runner import DECODERS, SEGFAULT_BLOB

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("LIVEUPDATE_FUZZ_EXAMPLES", "300"))


def _fuzz(names: list[str]) -> tuple[set[str], str]:
    """The decoders that held, and what the process said if it did not end well."""
    proc = subprocess.run([sys.executable, "-m", "tests.abi.fuzz_runner", str(EXAMPLES),
                           *names], cwd=ROOT, capture_output=True, text=True, timeout=900)
    held = {line.removesuffix(": ok") for line in proc.stdout.splitlines()
            if line.endswith(": ok")}
    if proc.returncode == 0:
        return held, ""
    return held, (f"exit {proc.returncode}"
                  + (" (killed by a signal: segfault?)" if proc.returncode < 0 else "")
                  + f"\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def test_every_decoder_survives_hostile_input() -> None:
    names = sorted(DECODERS)
    held, batch = _fuzz(names)
    # every decoder held but the process still ended badly (a crash at exit): that too fails
    failed: dict[str, str] = {"the fuzz process": batch} if batch and held == set(names) else {}
    for name in names:
        if name not in held:  # the batch ended before it: alone, it says its own verdict
            alone, why = _fuzz([name])
            if name not in alone:
                failed[name] = why
    assert not failed, "\n".join(f"{n}: {why}" for n, why in failed.items())


def test_libfdt_segfault_blob_is_refused_before_libfdt() -> None:
    code = ("from liveupdate.abi import fdt\n"
            "from liveupdate.errors import AbiError\n"
            f"blob = {SEGFAULT_BLOB!r}\n"
            "try:\n    fdt.parse(blob)\nexcept AbiError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "exceeds the" in proc.stdout
