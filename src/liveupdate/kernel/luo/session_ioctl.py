"""The sessions uAPI as ops tables, keyed by the uAPI's names (``luo_ioctl_ops`` and
``luo_session_ioctl_ops`` of ``luo_core.c``/``luo_session.c``): the dispatcher's checks
(:func:`liveupdate.abi.uapi.lookup`: number, size rules), then EBUSY while the reboot is under
way, then the command. Each entry returns the fields to copy back and the files to install."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from liveupdate.abi import uapi
from liveupdate.abi.uapi import Target
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs.file import File

if TYPE_CHECKING:
    from liveupdate.kernel.luo.session import LuoSessions, Session

Resolve = Callable[[int], File]
Reply = tuple[dict[str, Any], list[File]]


class DeviceOps:
    name = "liveupdate"

    def __init__(self, luo: LuoSessions) -> None:
        self.luo = luo

    def release(self, f: File) -> None:
        self.luo.device_open = False  # sessions are independent files: untouched

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Resolve) -> tuple[bytes, list[File]]:
        entry, a = _lookup(self.luo, Target.DEVICE, cmd, arg)
        new = DEVICE_IOCTLS[entry.name](self.luo, a["name"])
        reply = entry.pack(**{**a, "fd": 0})
        return reply[: min(a["size"], entry.size)], [new]


class SessionOps:
    name = "luo_session"

    def __init__(self, luo: LuoSessions) -> None:
        self.luo = luo

    def release(self, f: File) -> None:
        self.luo.close(f.private)

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Resolve) -> tuple[bytes, list[File]]:
        s: Session = f.private
        incoming = s.incoming is not None
        entry, a = _lookup(self.luo, Target.SESSION, cmd, arg,
                           lambda e: self.luo.rules.check_direction(e.name, incoming))
        out, new = SESSION_IOCTLS[entry.name](self.luo, f.private, a, fds, resolve)
        reply = entry.pack(**{**a, **out})
        return reply[: min(a["size"], entry.size)], new


def _lookup(luo: LuoSessions, target: Target, cmd: int, arg: bytes,
            before_size: Callable[[uapi.Ioctl], None] | None = None,
            ) -> tuple[uapi.Ioctl, dict[str, Any]]:
    try:
        found = uapi.lookup(luo.gen, target, cmd, arg, before_size)
    except AbiError as e:
        raise LiveUpdateError(err=e.errno, msg=e.message) from e
    if luo.frozen:
        raise LiveUpdateError(err=errno.EBUSY, msg="LUO: the reboot is under way")
    return found


def _preserve(luo: LuoSessions, s: Session, a: dict[str, Any], fds: list[int],
              resolve: Resolve) -> Reply:
    luo.preserve(s, a["token"], fds, resolve)
    return {}, []


def _retrieve(luo: LuoSessions, s: Session, a: dict[str, Any], fds: list[int],
              resolve: Resolve) -> Reply:
    return {"fd": 0}, [luo.retrieve_fd(s, a["token"])]


def _finish(luo: LuoSessions, s: Session, a: dict[str, Any], fds: list[int],
            resolve: Resolve) -> Reply:
    luo.rules.check_finish(a["reserved"])
    luo.finish(s)
    return {}, []


def _get_name(luo: LuoSessions, s: Session, a: dict[str, Any], fds: list[int],
              resolve: Resolve) -> Reply:
    if a["reserved"]:
        raise LiveUpdateError(err=errno.EINVAL, msg="GET_NAME: reserved must be 0")
    return {"name": s.name.encode("utf-8", uapi.NAME_ERRORS)}, []


def _create(luo: LuoSessions, raw: bytes) -> File:
    return luo.create(luo.rules.create_name(raw))


def _retrieve_session(luo: LuoSessions, raw: bytes) -> File:
    return luo.retrieve_session(luo.rules.retrieve_name(raw))


DEVICE_IOCTLS: dict[str, Callable[[LuoSessions, bytes], File]] = {
    "CREATE_SESSION": _create,
    "RETRIEVE_SESSION": _retrieve_session,
}
SESSION_IOCTLS: dict[str, Callable[[LuoSessions, Session, dict[str, Any], list[int], Resolve],
                                   Reply]] = {
    "SESSION_PRESERVE_FD": _preserve,
    "SESSION_RETRIEVE_FD": _retrieve,
    "SESSION_FINISH": _finish,
    "SESSION_GET_NAME": _get_name,
}
