"""``/dev/liveupdate`` as an object: the operations of both uAPI generations over one
:class:`~liveupdate.client.backends.Backend` -- the same struct bytes on a real kernel and on
the emulated one (invariant 4).

The generation is known before the first ioctl, from ``uname -r``
(:func:`~liveupdate.client.generation.generation_of`), never by probing: ioctl numbers collide
across generations. Calling an operation the generation does not have is EOPNOTSUPP, and
every failure is a :class:`~liveupdate.errors.LiveUpdateError` carrying the kernel's errno.
"""

from __future__ import annotations

import os
from typing import Any

from liveupdate.abi.uapi import Event, State
from liveupdate.abi.uapi_generation import UapiGeneration
from liveupdate.client.backends import Backend, open_backend
from liveupdate.client.generation import generation_of

DEV_LIVEUPDATE = "/dev/liveupdate"


class LiveUpdate:
    def __init__(self, backend: Backend | None = None, path: str = DEV_LIVEUPDATE) -> None:
        self.backend = backend or open_backend()
        self.gen = generation_of(self.backend.uname())
        self.fd = self.backend.open(path)

    @property
    def sessions(self) -> bool:
        return self.gen.sessions

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _need(self, sessions: bool, what: str) -> None:
        self.gen.need(sessions, what)

    def ioctl(self, fd: int, op: str, /, **fields: Any) -> dict[str, Any]:
        return ioctl(self.backend, self.gen, fd, op, **fields)

    # -- v3 -------------------------------------------------------------------------------
    def get_state(self) -> State:
        self._need(False, "GET_STATE")
        return State(self.ioctl(self.fd, "GET_STATE")["state"])

    def set_event(self, event: Event) -> None:
        self._need(False, "SET_EVENT")
        self.ioctl(self.fd, "SET_EVENT", event=int(event))

    def fd_preserve(self, fd: int, token: int) -> None:
        self._need(False, "FD_PRESERVE")
        self.ioctl(self.fd, "FD_PRESERVE", fd=fd, token=token)

    def fd_unpreserve(self, token: int) -> None:
        self._need(False, "FD_UNPRESERVE")
        self.ioctl(self.fd, "FD_UNPRESERVE", token=token)

    def fd_restore(self, token: int) -> int:
        self._need(False, "FD_RESTORE")
        return int(self.ioctl(self.fd, "FD_RESTORE", token=token)["fd"])

    # -- sessions (6.19+) -----------------------------------------------------------------
    def create_session(self, name: str) -> Session:
        self._need(True, "CREATE_SESSION")
        fd = int(self.ioctl(self.fd, "CREATE_SESSION", name=name.encode())["fd"])
        return Session(self.backend, self.gen, fd, name)

    def retrieve_session(self, name: str) -> Session:
        self._need(True, "RETRIEVE_SESSION")
        fd = int(self.ioctl(self.fd, "RETRIEVE_SESSION", name=name.encode())["fd"])
        return Session(self.backend, self.gen, fd, name)


def ioctl(backend: Backend, gen: UapiGeneration, fd: int, op: str, /, **fields: Any
          ) -> dict[str, Any]:
    """One ioctl by name: the struct packed, sent, and the kernel's reply unpacked."""
    entry = gen.ioctl(op)
    buf = bytearray(entry.pack(**fields))
    backend.ioctl(fd, entry.number, buf)
    return entry.unpack(bytes(buf))


class Session:
    """A session fd (mainline LUO). Closing it before the reboot drops what it preserved;
    closing a retrieved one finishes it. It needs no /dev/liveupdate: a process that was
    handed a session fd (luod's clients) uses it directly."""

    def __init__(self, backend: Backend, gen: UapiGeneration, fd: int, name: str) -> None:
        self.backend = backend
        self.gen = gen
        self.fd = fd
        self.name = name

    def _io(self, op: str, /, **fields: Any) -> dict[str, Any]:
        return ioctl(self.backend, self.gen, self.fd, op, **fields)

    def preserve_fd(self, fd: int, token: int) -> None:
        self._io("SESSION_PRESERVE_FD", fd=fd, token=token)

    def retrieve_fd(self, token: int) -> int:
        return int(self._io("SESSION_RETRIEVE_FD", token=token)["fd"])

    def finish(self) -> None:
        self._io("SESSION_FINISH")

    def get_name(self) -> str:
        raw: bytes = self._io("SESSION_GET_NAME")["name"]
        return raw.split(b"\0", 1)[0].decode()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
