"""Drive one live update through luod, as an administrator: ask for it, follow luod's phase
events, wait out the kexec, reconnect to the next kernel's luod and wait until every client
is back. ``luoctl update`` and ``luoctl demo`` both use it."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Any

from liveupdate.client.luod import LuodClient
from liveupdate.errors import LiveUpdateError

RECONNECT_SECONDS = 120.0


def admin(path: str, **kw: Any) -> LuodClient:
    return LuodClient(f"admin-{os.getpid()}", path=path, admin=True, **kw)


def luod_status(path: str) -> dict[str, Any]:
    """luod's status, over a short-lived administrator connection."""
    c = admin(path)
    try:
        return c.status()
    finally:
        c.close()


def reconnect(path: str, timeout: float = RECONNECT_SECONDS) -> LuodClient:
    """The next kernel's luod, once it listens (a CLI waiting for a daemon to start)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return admin(path)
        except LiveUpdateError as e:
            if time.monotonic() > deadline or e.errno not in (
                    errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE):
                raise
        time.sleep(0.05)


def load_image(path: str, image: str, cmdline: str | None = None,
               release: str | None = None) -> dict[str, Any]:
    """Ask luod to load the next kernel: its pre-flight verdict (``handover``: native or
    negotiated, and the formats), or LiveUpdateError with why it refused."""
    c = admin(path)
    try:
        loaded: dict[str, Any] = c.request("load", image=image, cmdline=cmdline,
                                           release=release)[0]
    finally:
        c.close()
    return loaded


def run_update(path: str, *, image: str | None = None, cmdline: str | None = None,
               release: str | None = None,
               on_phase: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One update; returns the next luod's status and the update's report (its phase
    timeline and how FINISH went). LiveUpdateError with luod's reason when it was refused
    or cancelled (no kexec happened)."""
    c = admin(path, on_phase=on_phase)
    before = c.status()["update"]
    try:
        c.request("update", image=image, cmdline=cmdline, release=release)
        raise LiveUpdateError(err=errno.EIO, msg="luod answered instead of rebooting")
    except LiveUpdateError as e:
        if e.errno != errno.ECONNRESET:  # luod going away is the kexec happening
            raise
    finally:
        c.close()
    if on_phase:
        on_phase({"phase": "kexec", "time": time.time()})
    c = reconnect(path)
    try:
        st = c.request("wait", timeout=RECONNECT_SECONDS)[0]
    finally:
        c.close()
    if st["update"] <= before:  # luod went away, but no kexec happened
        raise LiveUpdateError(err=errno.ECANCELED, msg=st.get("last_error")
                              or "luod went away and the update did not happen")
    return st, st["reports"][-1] if st.get("reports") else {}
