"""A synchronous QMP client: enough to stop a guest, save its RAM and let it go on.

QEMU's own ``qemu.qmp`` is asyncio-based and its sync wrapper is marked legacy; four
commands over one socket do not need it. Events that arrive between replies are skipped
(QMP interleaves them: QEMU's docs/interop/qmp-spec.rst).

We listen and QEMU connects (``-chardev socket,server=off``): no polling for a socket that
QEMU has not bound yet. The socket lives in a private temporary folder, not in the results
folder: a Unix socket path is limited to 107 bytes and a results folder may be deeper.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from liveupdate.errors import LiveUpdateError

COMMAND_TIMEOUT = 300.0  # dump-guest-memory of 512 MiB to a slow disk


class Listener:
    """A unix socket QEMU connects its monitor to; :meth:`qemu_args` says how."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="luqmp"))
        self.path = self.dir / "qmp.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(str(self.path))
            self.sock.listen(1)
        except OSError:
            self.close()
            raise

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
            except TimeoutError:
                if not alive():
                    raise LiveUpdateError(err=errno.ECHILD, msg="QEMU exited before it "
                                          "connected its monitor") from None
                if time.monotonic() > deadline:
                    raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"QEMU never connected "
                                          f"to {self.path}") from None
                continue
            try:
                return Qmp(conn)
            except BaseException:
                conn.close()
                raise

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Qmp:
    """One QMP session: the greeting read, capabilities negotiated, then commands."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(COMMAND_TIMEOUT)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except TimeoutError:
            raise LiveUpdateError(err=errno.ETIMEDOUT, msg="QEMU did not answer on QMP "
                                  f"within {COMMAND_TIMEOUT:.0f} s") from None
        if not line:
            raise LiveUpdateError(err=errno.ECONNRESET, msg="QEMU closed its QMP socket")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise LiveUpdateError(err=errno.EPROTO, msg=f"QMP: not a JSON object: {line[:80]!r}")
        return msg

    def execute(self, cmd: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise LiveUpdateError(err=errno.EIO, msg=f"QMP {cmd}: {desc}")
            return msg.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()
