"""Run ``luoctl`` in this process (click's ``CliRunner``) and read its JSON.

A ``luoctl`` start is ~0.18 s of CPU (Python, numpy, the parsers); the inspector's tests
run it ~120 times, so they call the command in process. What only a process shows -- the
module entry point, one line on standard error and no traceback at exit, a resource limit
-- is checked by the few tests that still run ``LUOCTL`` as its own process. An exception
that escapes a command fails the test here: as a process it would have been a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from liveupdate.cli.luoctl import main

LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]


def luoctl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``luoctl ARGS`` in process: its exit status, standard output and standard error."""
    argv = [str(a) for a in args]
    r = CliRunner().invoke(main, argv, prog_name="luoctl")
    if r.exc_info is not None and not isinstance(r.exc_info[1], SystemExit):
        raise AssertionError(f"luoctl {' '.join(argv)} raised (a traceback as a process):\n"
                             + "".join(traceback.format_exception(*r.exc_info)))
    return subprocess.CompletedProcess(["luoctl", *argv], r.exit_code, r.stdout, r.stderr)


def inspect(*args: str | Path) -> tuple[int, dict[str, Any], str]:
    """``luoctl inspect --json ARGS``: exit status, the report, standard error."""
    p = luoctl("inspect", "--json", *args)
    return p.returncode, json.loads(p.stdout) if p.stdout else {}, p.stderr
