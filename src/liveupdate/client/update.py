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
    timeline and how FINISH went). ``on_phase`` hears luod's phase events, each with the
    update's number (``update``). LiveUpdateError with luod's reason when it was refused
    or cancelled (no kexec happened)."""
    number = {"update": 0}  # the update's number, in every phase event

    def phase(ev: dict[str, Any]) -> None:
        if on_phase:
            on_phase({**ev, **number})

    c = admin(path, on_phase=phase)
    before = c.status()["update"]
    number["update"] = before + 1
    try:
        c.request("update", image=image, cmdline=cmdline, release=release)
        raise LiveUpdateError(err=errno.EIO, msg="luod answered instead of rebooting")
    except LiveUpdateError as e:
        if e.errno != errno.ECONNRESET:  # luod going away is the kexec happening
            raise
    finally:
        c.close()
    phase({"phase": "kexec", "time": time.time()})
    return wait_update(path, before + 1)


def wait_update(path: str, update: int | None = None, timeout: float = RECONNECT_SECONDS
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The outcome of update number ``update`` (None: the latest), once luod is NORMAL and
    idle: its status and that update's report (``{}`` when the luod that FINISHed it is not
    the one answering). Waits up to ``timeout`` for luod to listen -- after a real kexec it
    starts in the next kernel -- and as long again for it to FINISH. LiveUpdateError
    (ECANCELED, with luod's reason) when luod is back but that update did not happen.

    This is how an update is followed on a real host, where the kexec kills ``luoctl
    update`` with the kernel it ran on: a script remembers luod's update count before, and
    in the next kernel asks for the one after it (``luoctl wait --update N``)."""
    c = reconnect(path, timeout)
    try:
        st = c.request("wait", timeout=timeout)[0]
    finally:
        c.close()
    want = int(st["update"]) if update is None else update
    if st["update"] < want:  # luod went away, but no kexec happened
        raise LiveUpdateError(err=errno.ECANCELED, msg=st.get("last_error")
                              or f"update {want} did not happen (luod is at update "
                              f"{st['update']})")
    report: dict[str, Any] = next(
        (r for r in st.get("reports", []) if r.get("update") == want), {})
    return st, report
