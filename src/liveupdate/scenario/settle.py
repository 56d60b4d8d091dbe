"""Waiting for a system of daemons to settle, as a CLI watching them does: poll a condition
until it holds or a deadline passes. Used where no event says the state changed (another
process's daemon, a kernel in QEMU); tests never synchronize this way."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any

from liveupdate.errors import LiveUpdateError


def settle(what: str, check: Callable[[], Any], timeout: float, step: float) -> Any:
    """``check()``'s first truthy result (an error counts as not yet), polled every
    ``step`` seconds; ETIMEDOUT naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except (LiveUpdateError, OSError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"timed out waiting for {what}")
        time.sleep(step)
