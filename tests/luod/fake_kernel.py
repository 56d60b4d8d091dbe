"""A tiny in-process LUO behind luod's Backend interface, for testing luod's orchestration
without a machine: the uAPI structs of :mod:`liveupdate.abi.uapi` (packed and unpacked as on
a real kernel), v3's global state machine or mainline's sessions, chosen by the release.

Files are real fds, recognized by (st_dev, st_ino) as the emulated kernel does: a session is
one end of a socketpair (the kernel keeps the other and sees the hang-up when every copy is
closed -- "closing a session unpreserves"), a preserved memfd is kept as a dup.
:meth:`FakeLuo.reboot` is the kexec: what is preserved becomes the next kernel's incoming.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from dataclasses import dataclass, field

from liveupdate.abi import uapi
from liveupdate.abi.uapi import Event, State
from liveupdate.abi.uapi_generation import uapi_of
from liveupdate.client.backends import RealBackend
from liveupdate.errors import LiveUpdateError


class Rebooted(Exception):
    """reboot(LINUX_REBOOT_CMD_KEXEC) succeeded: the next kernel is ``luo``."""

    def __init__(self, luo: FakeLuo) -> None:
        super().__init__("rebooted")
        self.luo = luo


def _ino(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


@dataclass
class FakeSession:
    name: str
    peer: socket.socket  # the kernel's end
    tokens: dict[int, int] = field(default_factory=dict)  # token -> kept memfd
    incoming: bool = False
    finished: bool = False

    def closed(self) -> bool:
        """Every copy of the process's end is closed (POLLHUP on ours)."""
        return bool(select.select([self.peer], [], [], 0)[0]) and self.peer.recv(1) == b""


class FakeLuo:
    def __init__(self, release: str, incoming: dict[str, dict[int, int]] | None = None,
                 boot: int = 0) -> None:
        self.release = release
        self.gen = uapi_of(release)
        self.boot = boot
        self.state = State.UPDATED if incoming else State.NORMAL
        self.tokens: dict[int, int] = {}  # v3: global token -> kept memfd
        self.sessions: dict[tuple[int, int], FakeSession] = {}
        self.incoming = incoming or {}  # v3: {"": tokens}; sessions: name -> tokens
        self.loaded: list[tuple[str, str]] = []
        self.events: list[str] = []  # what luod asked of the kernel, in order
        self.device_open = False

    # -- what a test looks at -------------------------------------------------------------
    def preserved(self) -> dict[str, dict[int, int]]:
        """What would cross a reboot now: v3 tokens once PREPARE was sent; the sessions
        nobody closed."""
        if not self.gen.sessions:
            return {"": dict(self.tokens)} if self.state in (State.PREPARED, State.FROZEN) \
                else {}
        return {s.name: dict(s.tokens) for s in self.sessions.values()
                if not s.incoming and not s.closed()}

    def reboot(self) -> FakeLuo:
        return FakeLuo(self.release, self.preserved(), self.boot + 1)

    # -- the uAPI -------------------------------------------------------------------------
    def _session(self, fd: int) -> FakeSession:
        s = self.sessions.get(_ino(fd))
        if s is None:
            raise LiveUpdateError(err=errno.EBADF, msg="not a session")
        return s

    def _new_session(self, name: str, tokens: dict[int, int], incoming: bool) -> int:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        fd = mine.detach()
        self.sessions[_ino(fd)] = FakeSession(name, theirs, dict(tokens), incoming)
        return fd

    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None:
        entry = uapi.entry_for(self.gen.gen, cmd)
        if entry is None:
            raise LiveUpdateError(err=errno.ENOTTY, msg=f"ioctl {cmd:#x}")
        args = entry.unpack(bytes(buf))
        self.events.append(entry.name)
        out = getattr(self, "_" + entry.name.lower())(fd, **{
            k: v for k, v in args.items() if k not in ("size", "reserved")})
        if out:
            buf[:] = entry.pack(**{**args, **out})

    def _keep(self, fd: int) -> int:
        return os.dup(fd)

    # v3
    def _get_state(self, dev: int, state: int) -> dict[str, int]:
        return {"state": int(self.state)}

    def _set_event(self, dev: int, event: int) -> None:
        nxt = {(State.NORMAL, Event.PREPARE): State.PREPARED,
               (State.PREPARED, Event.CANCEL): State.NORMAL,
               (State.FROZEN, Event.CANCEL): State.NORMAL,
               (State.UPDATED, Event.FINISH): State.NORMAL}.get((self.state, Event(event)))
        if nxt is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"{Event(event).name} while "
                                  f"{self.state.name}")
        if Event(event) is Event.FINISH:
            self.incoming = {}
        self.state = nxt

    def _fd_preserve(self, dev: int, fd: int, token: int) -> None:
        if token in self.tokens:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"token {token:#x}")
        self.tokens[token] = self._keep(fd)

    def _fd_unpreserve(self, dev: int, token: int) -> None:
        if self.tokens.pop(token, None) is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"token {token:#x}")

    def _fd_restore(self, dev: int, fd: int, token: int) -> dict[str, int]:
        kept = self.incoming.get("", {}).pop(token, None)
        if kept is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"token {token:#x}")
        return {"fd": kept}

    # sessions
    def _create_session(self, dev: int, fd: int, name: bytes) -> dict[str, int]:
        text = name.split(b"\0", 1)[0].decode()
        if any(s.name == text and not s.closed() for s in self.sessions.values()) \
                or text in self.incoming:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"session {text}")
        return {"fd": self._new_session(text, {}, incoming=False)}

    def _retrieve_session(self, dev: int, fd: int, name: bytes) -> dict[str, int]:
        text = name.split(b"\0", 1)[0].decode()
        tokens = self.incoming.pop(text, None)
        if tokens is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"session {text}")
        return {"fd": self._new_session(text, tokens, incoming=True)}

    def _session_preserve_fd(self, sfd: int, fd: int, token: int) -> None:
        s = self._session(sfd)
        if token in s.tokens:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"token {token:#x}")
        s.tokens[token] = self._keep(fd)

    def _session_retrieve_fd(self, sfd: int, fd: int, token: int) -> dict[str, int]:
        kept = self._session(sfd).tokens.pop(token, None)
        if kept is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"token {token:#x}")
        return {"fd": kept}

    def _session_finish(self, sfd: int) -> None:
        self._session(sfd).finished = True


class FakeBackend(RealBackend):
    """luod's Backend over a :class:`FakeLuo`: memfds and mappings are the host's own."""

    def __init__(self, luo: FakeLuo, cmdline: str = "") -> None:
        self.luo = luo
        self._cmdline = cmdline

    def uname(self) -> str:
        return self.luo.release

    def cmdline(self) -> str:
        return self._cmdline

    def boot_id(self) -> str:
        return f"fake-boot-{self.luo.boot}"

    def open(self, path: str) -> int:
        if self.luo.device_open:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"open {path}")
        self.luo.device_open = True
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None:
        self.luo.ioctl(fd, cmd, buf)

    def kexec_file_load(self, image: str, cmdline: str) -> None:
        self.luo.loaded.append((image, cmdline))

    def reboot_kexec(self) -> None:
        if not self.luo.loaded:
            raise LiveUpdateError(err=errno.EINVAL, msg="nothing loaded")
        raise Rebooted(self.luo.reboot())
