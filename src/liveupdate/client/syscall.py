"""The userspace end of the emulated kernel's syscall transport.

A process started by the emulated kernel finds its connection's fd in ``LU_SYSCALL_FD``. Each
call sends one request (with any fds it passes, SCM_RIGHTS) and waits for its reply; an errno
reply raises LiveUpdateError. Fds in a reply become the caller's own.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import threading
from typing import Any

from liveupdate.abi import syscalls, wire
from liveupdate.errors import LiveUpdateError

MAX_REPLY = 64 << 20
MAX_FDS = 253  # SCM_MAX_FD


class Kernel:
    """A connection to the emulated kernel."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            value = os.environ.get(syscalls.SYSCALL_FD_ENV)
            if value is None or not value.isdigit():
                raise LiveUpdateError(err=errno.ENOSYS, msg="not running on the emulated kernel "
                                      f"({syscalls.SYSCALL_FD_ENV} is not set)")
            fd = int(value)
        self.sock = socket.socket(fileno=fd)
        self._lock = threading.Lock()

    def call_fds(self, op: str, payload: bytes = b"", fds: list[int] | None = None,
                 **args: Any) -> wire.Message:
        """One call passing ``fds``; the reply's fds are the caller's to close."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with self._lock:
            try:
                self.sock.sendmsg([wire.pack({"op": op, **args}, payload)], anc)
                msg, ranc, _flags, _addr = self.sock.recvmsg(MAX_REPLY,
                                                             socket.CMSG_SPACE(4 * MAX_FDS))
            except OSError as e:
                raise LiveUpdateError(err=errno.EIO, msg=f"syscall {op}: {e}") from e
        got = array.array("i")
        for level, kind, data in ranc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(data[: len(data) - len(data) % got.itemsize])
        if not msg:
            raise LiveUpdateError(
                err=errno.EIO, msg=f"syscall {op}: the kernel closed the connection")
        reply, data = wire.unpack(msg)
        if reply.get("errno"):
            for fd in got:
                os.close(fd)
            raise LiveUpdateError(err=int(reply["errno"]), msg=str(reply.get("message", "")))
        return wire.Message(reply, data, got.tolist())

    def call(self, op: str, payload: bytes = b"", **args: Any) -> tuple[dict[str, Any], bytes]:
        m = self.call_fds(op, payload, **args)
        for fd in m.fds:  # a call that returns no file: nothing to keep
            os.close(fd)
        return m.header, m.payload

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
