"""The machine's console (the serial port every kernel process writes to): kept whole in
``DIR/console.log``, its newest bytes in memory for waits, so the machine's memory does not
grow with every boot's log."""

from __future__ import annotations

import errno
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from liveupdate.errors import LiveUpdateError

# the console's newest bytes kept in memory for waits; older offsets are read from the file
CONSOLE_KEEP = 64 << 10


class Console:
    """The console's bytes, shared by the readers of every kernel's console pipe and the
    control requests that wait on them. ``cond`` is the machine's condition: a wait wakes
    on new bytes and on a change of the machine's state alike."""

    def __init__(self, path: str, cond: threading.Condition) -> None:
        self.path = path
        self.cond = cond
        self.tail = bytearray()  # the newest part of the console; all of it is in the file
        self.base = 0  # absolute offset of self.tail[0]
        self.file = open(path, "wb")  # noqa: SIM115 - lives with the machine

    @property
    def end(self) -> int:
        return self.base + len(self.tail)

    def append(self, data: bytes) -> None:
        with self.cond:
            self.tail += data
            if len(self.tail) > CONSOLE_KEEP:
                drop = len(self.tail) - CONSOLE_KEEP // 2
                del self.tail[:drop]
                self.base += drop
            self.file.write(data)
            self.file.flush()
            self.cond.notify_all()

    def since(self, offset: int) -> tuple[int, bytes]:
        """(base, bytes): the console from ``offset`` (clamped to 0) to now; the part older
        than the in-memory tail comes from the console file. Call with ``cond`` held."""
        offset = max(0, offset)
        if offset >= self.base:
            return offset, bytes(self.tail[offset - self.base :])
        with open(self.path, "rb") as f:
            f.seek(offset)
            old = f.read(self.base - offset)
        return offset, old + bytes(self.tail)

    def wait(self, pattern: str, offset: int, timeout: float,
             stopped: Callable[[], str | None]) -> dict[str, Any]:
        """The first match of ``pattern`` at or after ``offset``: its offsets and its line.
        ``stopped`` (called with ``cond`` held) says why nothing more can come -- the
        machine is off or panicked and its kernel's console drained -- or None."""
        try:
            rx = re.compile(pattern.encode())
        except re.error as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"bad pattern: {e}") from e
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                base, text = self.since(offset)
                m = rx.search(text)
                if m:
                    line_start = text.rfind(b"\n", 0, m.start()) + 1
                    line_end = text.find(b"\n", m.end())
                    line = text[line_start : line_end if line_end >= 0 else None]
                    return {"start": base + m.start(), "end": base + m.end(),
                            "line": line.decode(errors="replace")}
                why = stopped()
                if why is not None:
                    raise LiveUpdateError(err=errno.EIO, msg=f"{why} and the console never "
                                          f"matched {pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LiveUpdateError(err=errno.ETIMEDOUT,
                                          msg=f"console did not match {pattern!r} in {timeout}s")
                self.cond.wait(left)
