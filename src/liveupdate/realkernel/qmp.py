"""A synchronous QMP client: enough to stop a guest, save its RAM and let it go on.

QEMU's own ``qemu.qmp`` is asyncio-based and its sync wrapper is marked legacy; four
commands over one socket do not need it. Events that arrive between replies are skipped
(QMP interleaves them: QEMU's docs/interop/qmp-spec.rst).

We listen and QEMU connects (``-chardev socket,server=off``): no polling for a socket that
QEMU has not bound yet.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from liveupdate.errors import LiveUpdateError


class Listener:
    """A unix socket QEMU connects its monitor to; :meth:`qemu_args` says how."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)

    def qemu_args(self) -> str:
        return (f"-chardev socket,id=luqmp,path={self.path},server=off "
                "-mon chardev=luqmp,mode=control")

    def accept(self, timeout: float, alive: Callable[[], bool]) -> Qmp:
        """QEMU's connection; gives up early when ``alive()`` says QEMU (or the virtme-ng
        that would start it) has exited."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(1.0)
        while True:
            try:
                conn, _ = self.sock.accept()
                return Qmp(conn, timeout)
            except TimeoutError:
                if not alive():
                    raise LiveUpdateError(err=errno.ECHILD, msg="QEMU exited before it "
                                          "connected its monitor") from None
                if time.monotonic() > deadline:
                    raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"QEMU never connected "
                                          f"to {self.path}") from None

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Qmp:
    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")
    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise LiveUpdateError(err=errno.ECONNRESET, msg="QEMU closed its QMP socket")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, cmd: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                raise LiveUpdateError(err=errno.EIO, msg=f"QMP {cmd}: "
                                      f"{msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()
