"""The userspace end of the emulated kernel's syscall transport.

A process started by the emulated kernel finds its connection's fd in ``LU_SYSCALL_FD``. Each
call sends one request and waits for its reply; an errno reply raises LiveUpdateError.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Any

from liveupdate.abi import syscalls, wire
from liveupdate.errors import LiveUpdateError

MAX_REPLY = 64 << 20


class Kernel:
    """A connection to the emulated kernel."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            value = os.environ.get(syscalls.SYSCALL_FD_ENV)
            if value is None or not value.isdigit():
                raise LiveUpdateError(errno.ENOSYS, "not running on the emulated kernel "
                                      f"({syscalls.SYSCALL_FD_ENV} is not set)")
            fd = int(value)
        self.sock = socket.socket(fileno=fd)
        self._lock = threading.Lock()

    def call(self, op: str, payload: bytes = b"", **args: Any) -> tuple[dict[str, Any], bytes]:
        with self._lock:
            try:
                self.sock.send(wire.pack({"op": op, **args}, payload))
                msg = self.sock.recv(MAX_REPLY)
            except OSError as e:
                raise LiveUpdateError(errno.EIO, f"syscall {op}: {e}") from e
        if not msg:
            raise LiveUpdateError(errno.EIO, f"syscall {op}: the kernel closed the connection")
        reply, data = wire.unpack(msg)
        if reply.get("errno"):
            raise LiveUpdateError(int(reply["errno"]), str(reply.get("message", "")))
        return reply, data

    def uname(self) -> str:
        return str(self.call("uname")[0]["release"])

    def cmdline(self) -> str:
        return str(self.call("cmdline")[0]["cmdline"])

    def kexec_file_load(self, image: bytes, cmdline: str) -> dict[str, Any]:
        return self.call("kexec_file_load", image, cmdline=cmdline)[0]

    def kexec_unload(self) -> None:
        self.call("kexec_file_load", unload=True)

    def reboot(self, cmd: int) -> None:
        self.call("reboot", cmd=cmd)

    def debugfs_read(self, path: str) -> bytes:
        return self.call("debugfs_read", path=path)[1]

    def debugfs_write(self, path: str, value: bytes) -> None:
        self.call("debugfs_write", value, path=path)
