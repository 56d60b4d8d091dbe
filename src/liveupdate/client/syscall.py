"""The userspace end of the emulated kernel's syscall transport.

A process started by the emulated kernel finds its connection's fd in ``LU_SYSCALL_FD``. Each
call sends one request (with any fds it passes, SCM_RIGHTS) and waits for its reply; an errno
reply raises LiveUpdateError. Fds in a reply become the caller's own.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
from typing import Any

from liveupdate.abi import devices_uapi, syscalls, wire
from liveupdate.abi.uapi_generation import UapiGeneration
from liveupdate.client.generation import generation_of
from liveupdate.client.mapping import Mapping, map_extents
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import fds as fdpass

MAX_REPLY = wire.SEQPACKET_BUFFER
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
        self._gen: UapiGeneration | None = None

    def call_fds(self, op: str, payload: bytes = b"", fds: list[int] | None = None,
                 **args: Any) -> wire.Message:
        """One call passing ``fds``; the reply's fds are the caller's to close."""
        with self._lock:
            try:
                fdpass.sendmsg(self.sock, wire.pack({"op": op, **args}, payload), fds or ())
                msg, got, _flags = fdpass.recvmsg(self.sock, MAX_REPLY, MAX_FDS)
            except OSError as e:
                raise LiveUpdateError(err=errno.EIO, msg=f"syscall {op}: {e}") from e
        if not msg:
            raise LiveUpdateError(
                err=errno.EIO, msg=f"syscall {op}: the kernel closed the connection")
        reply, data = wire.unpack(msg)
        if reply.get("errno"):
            for fd in got:
                os.close(fd)
            raise LiveUpdateError(err=int(reply["errno"]), msg=str(reply.get("message", "")))
        return wire.Message(reply, data, got)

    def call(self, op: str, payload: bytes = b"", **args: Any) -> tuple[dict[str, Any], bytes]:
        m = self.call_fds(op, payload, **args)
        for fd in m.fds:  # a call that returns no file: nothing to keep
            os.close(fd)
        return m.header, m.payload

    def uname(self) -> str:
        return str(self.call("uname")[0]["release"])

    def cmdline(self) -> str:
        return str(self.call("cmdline")[0]["cmdline"])

    def boot_id(self) -> str:
        return str(self.call("boot_id")[0]["boot_id"])

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

    # -- files ----------------------------------------------------------------------------
    def _new_fd(self, op: str, payload: bytes = b"", fds: list[int] | None = None,
                **args: Any) -> int:
        m = self.call_fds(op, payload, fds, **args)
        if len(m.fds) != 1:
            for fd in m.fds:
                os.close(fd)
            raise LiveUpdateError(err=errno.EIO, msg=f"{op}: expected one fd back")
        return m.fds[0]

    def _on(self, op: str, fd: int, payload: bytes = b"", **args: Any) -> wire.Message:
        return self.call_fds(op, payload, [fd], **args)

    def open(self, path: str, flags: int = 0) -> int:
        """``open(path, O_RDWR | flags)``: a handle the caller owns (close it with
        ``os.close``). ``/proc/self/fd/N`` names one of this process's fds: it rides along,
        as only the process knows what its fd N is."""
        own = re.fullmatch(r"/proc/self/fd/(\d+)", path)
        fds = [int(own.group(1))] if own and _is_open(int(own.group(1))) else []
        return self._new_fd("open", fds=fds, path=path, flags=flags)

    def memfd_create(self, name: str, flags: int = 0) -> int:
        return self._new_fd("memfd_create", name=name, flags=flags)

    def ftruncate(self, fd: int, size: int) -> None:
        self._on("ftruncate", fd, size=size)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """Write all of ``data`` (in pieces of at most ``wire.IO_PIECE``)."""
        done = 0
        for off in range(0, len(data), wire.IO_PIECE):
            piece = data[off : off + wire.IO_PIECE]
            done += int(self._on("pwrite", fd, piece, offset=offset + off).header["written"])
        return done

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        """Read up to ``count`` bytes (less only at the end of the file)."""
        out = bytearray()
        while len(out) < count:
            piece = self._on("pread", fd, count=min(wire.IO_PIECE, count - len(out)),
                             offset=offset + len(out)).payload
            if not piece:
                break
            out += piece
        return bytes(out)

    def write(self, fd: int, data: bytes) -> int:
        done = 0
        for off in range(0, len(data), wire.IO_PIECE):
            done += int(self._on("write", fd, data[off : off + wire.IO_PIECE])
                        .header["written"])
        return done

    def read(self, fd: int, count: int) -> bytes:
        """One ``read``: at most ``wire.IO_PIECE`` bytes, as a short read is allowed."""
        return self._on("read", fd, count=min(count, wire.IO_PIECE)).payload

    def lseek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
        return int(self._on("lseek", fd, offset=offset, whence=whence).header["offset"])

    def fstat(self, fd: int) -> dict[str, Any]:
        return self._on("fstat", fd).header

    def add_seals(self, fd: int, seals: int) -> None:
        """``fcntl(fd, F_ADD_SEALS, seals)``."""
        self._on("add_seals", fd, seals=seals)

    def get_seals(self, fd: int) -> int:
        """``fcntl(fd, F_GET_SEALS)``."""
        return int(self._on("get_seals", fd).header["seals"])

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._on("fallocate", fd, mode=mode, offset=offset, length=length)

    def mmap(self, fd: int, length: int, offset: int = 0) -> Mapping:
        """Map ``length`` bytes of a memfd as one contiguous range (zero copy, see
        :mod:`liveupdate.client.mapping`). The mapping keeps the folios alive."""
        m = self._on("mmap", fd, offset=offset, length=length)
        try:
            extents = [(int(p), int(n)) for p, n in m.header["extents"]]
            return map_extents(m.fds[0], extents)
        finally:
            for f in m.fds:
                os.close(f)

    def extents(self, fd: int, length: int, offset: int = 0) -> list[tuple[int, int]]:
        """The physical extents ``mmap`` would map (for tools that prove zero copy)."""
        m = self._on("mmap", fd, offset=offset, length=length)
        for f in m.fds:
            os.close(f)
        return [(int(p), int(n)) for p, n in m.header["extents"]]

    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None:
        """``ioctl(fd, cmd, buf)`` with the uAPI struct bytes in ``buf`` (updated in place).

        fd fields of the struct are translated as a real kernel's would be read: the fds
        named by ``fd_in`` fields ride along (a negative or closed fd is not attached, and
        the kernel answers EBADF); fds the kernel returns are patched into ``fd_out``
        fields as numbers of this process."""
        entry = devices_uapi.entry_for(cmd) or self.generation.entry_for(cmd)
        fds: list[int] = []
        if entry is not None:
            for name in entry.fd_in:
                value = entry.field(bytes(buf), name)
                if value >= 0 and _is_open(value):
                    fds.append(value)
        m = self.call_fds("ioctl", bytes(buf), [fd, *fds], cmd=cmd)
        buf[: len(m.payload)] = m.payload
        if entry is not None:
            for name, new in zip(entry.fd_out, m.fds, strict=False):
                if len(m.payload) >= entry.field_end(name):
                    entry.set_field(buf, name, new)

    @property
    def generation(self) -> UapiGeneration:
        if self._gen is None:
            self._gen = generation_of(self.uname())
        return self._gen


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
