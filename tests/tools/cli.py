"""Run ``luoctl`` as a user does (its own process) and read its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]


def inspect(*args: str | Path) -> tuple[int, dict[str, Any], str]:
    """``luoctl inspect --json ARGS``: exit status, the report, standard error."""
    p = subprocess.run([*LUOCTL, "inspect", "--json", *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    return p.returncode, json.loads(p.stdout) if p.stdout else {}, p.stderr
