"""The control socket's framing: ``u32 length`` then one :mod:`liveupdate.abi.wire` message."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

from liveupdate.abi import wire
from liveupdate.errors import LiveUpdateError

_LEN = struct.Struct("<I")


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    msg = wire.pack(header, payload)
    sock.sendall(_LEN.pack(len(msg)) + msg)


def recv(sock: socket.socket) -> tuple[dict[str, Any], bytes] | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > wire.MAX_MESSAGE:
        raise LiveUpdateError(err=errno.EMSGSIZE, msg=f"control message of {n} bytes is too large")
    msg = _recv_exact(sock, n)
    if msg is None:
        return None
    return wire.unpack(msg)
