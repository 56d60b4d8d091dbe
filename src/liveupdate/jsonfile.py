"""A JSON file replaced whole: written beside itself, then renamed over the old one, so a
reader -- another process, or the next luod after a crash -- sees the old content or the new,
never half of either."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any


def dump(path: str, value: Any, indent: int | None = None) -> None:
    """``value`` as JSON into ``path``; OSError as the write or the rename failed, TypeError
    for a value JSON cannot hold (the old file is then untouched, and no temporary file is
    left)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
