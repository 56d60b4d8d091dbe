"""Ask a running VMM over its control socket (luod's framing): ``status``, ``verify``,
``resize``. Used by ``luoctl demo`` and the tests; host-side tools reach the emulated
machine's VMMs at ``<machine>/run/vmm-NAME.sock``."""

from __future__ import annotations

import errno
import socket
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.luod import protocol

_ERRNO = {name: num for num, name in errno.errorcode.items()}


def ask(path: str, op: str, timeout: float = 60.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            protocol.send(s, {"op": op, "id": 1})
            got = protocol.recv(s)
        except OSError as e:
            raise LiveUpdateError(err=e.errno or errno.EIO, msg=f"vmm at {path}: {e}") from e
    if got is None:
        raise LiveUpdateError(err=errno.ECONNRESET, msg=f"vmm at {path} hung up")
    reply = got[0]
    if not reply.get("ok"):
        raise LiveUpdateError(err=_ERRNO.get(str(reply.get("errno")), errno.EIO),
                              msg=str(reply.get("error")))
    return reply
