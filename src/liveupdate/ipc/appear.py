"""Waiting for a service's socket to appear, without polling: ``inotify(7)`` on its folder.

A service binds and listens under a temporary name and renames it into place
(:func:`liveupdate.ipc.service.listen`), so the name appears only when it answers; its
clients -- started beside it after a kexec -- wait for ``IN_CREATE`` or ``IN_MOVED_TO`` of that
name instead of sleeping between tries (a 50 ms sleep was a part of every VM's blackout).
Real Linux has the same calls: this runs unchanged on either kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import threading
import time

IN_CREATE, IN_MOVED_TO, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0x80, 0o4000, 0o2000000
FALLBACK = 0.05
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len -- then the name


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):  # the process's own business: nothing to report
        os.close(fd)


class Watch:
    """An inotify watch on ``path``'s folder for ``path`` appearing; made before the first
    try, so an appearance between a failed try and the wait is not missed. Without a watch
    (no folder yet, no inotify) :meth:`wait` waits :data:`FALLBACK` seconds, as a poll."""

    def __init__(self, path: str) -> None:
        self.folder, self.name = os.path.split(os.path.abspath(path))
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if self.fd >= 0 and libc.inotify_add_watch(
                self.fd, os.fsencode(self.folder), IN_CREATE | IN_MOVED_TO) < 0:
            os.close(self.fd)
            self.fd = -1

    def wait(self, timeout: float) -> bool:
        """Whether the name appeared (since the watch was made) within ``timeout``."""
        if self.fd < 0:
            select.select([], [], [], min(timeout, FALLBACK))
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return False
            data = os.read(self.fd, 65536)
            at = 0
            while at + _EVENT.size <= len(data):
                _, _, _, n = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + n].rstrip(b"\0")
                at += _EVENT.size + n
                if os.fsdecode(name) == self.name:
                    return True
        return False

    def close(self) -> None:
        """Closed by a thread of its own: releasing an inotify instance waits for an SRCU
        grace period (``fsnotify_destroy_group`` -> ``synchronize_srcu``), 15-20 ms here --
        which a VMM restoring after a kexec would otherwise spend between luod's hello and
        its first retrieve, inside its VM's pause."""
        if self.fd >= 0:
            threading.Thread(target=_close, args=(self.fd,), name="inotify-close",
                             daemon=True).start()
            self.fd = -1

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
