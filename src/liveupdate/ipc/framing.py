"""One record = one UTF-8 JSON object of at most :data:`MAX_MESSAGE` bytes on a
``SOCK_SEQPACKET`` socket, with at most :data:`MAX_FDS` fds beside it (SCM_RIGHTS).

Everything received is validated: a record that is not a JSON object within
:data:`MAX_MESSAGE` bytes, or carries more than :data:`MAX_FDS` fds, is refused (its fds
closed), never half-read.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import fds as fdpass

MAX_MESSAGE = 64 << 10
MAX_FDS = 8


def send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    raw = json.dumps(msg, separators=(",", ":")).encode()
    if len(raw) > MAX_MESSAGE:
        raise LiveUpdateError(err=errno.EMSGSIZE, msg=f"luod message of {len(raw)} bytes")
    fdpass.sendmsg(sock, raw, fds)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message, or None at the end of the connection. LiveUpdateError (EPROTO) for a
    malformed one; its fds are closed."""
    raw, fds, flags = fdpass.recvmsg(sock, MAX_MESSAGE + 1, MAX_FDS)
    if not raw and not fds:
        return None
    if flags & socket.MSG_CTRUNC and len(fds) < MAX_FDS:
        # Linux also truncates when the receiver runs out of fd slots while installing
        # them (scm_detach_fds stops early): fewer than MAX_FDS arrived -- not a peer error
        _close(fds)
        raise LiveUpdateError(err=errno.EMFILE, msg="luod has no free file descriptor for "
                              "the fds sent with this message")
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(raw) > MAX_MESSAGE:
            raise ValueError("message or its fds too large")
        msg = json.loads(raw)
        if not isinstance(msg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        _close(fds)
        raise LiveUpdateError(err=errno.EPROTO, msg=f"luod protocol: {e}") from e
    return msg, fds


def field(msg: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """A request's field of type ``kind`` (a bool is not an int); EINVAL otherwise."""
    value = msg.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"luod protocol: {name!r} must be "
                              f"{kind.__name__}")
    return value
