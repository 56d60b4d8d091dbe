"""File descriptors beside a record (SCM_RIGHTS): the one helper for every socket that carries
them -- the services of :mod:`liveupdate.ipc`, the emulated kernel's syscall transport on both
ends. Linux passes fds as ``SCM_RIGHTS`` control messages (``unix_stream_sendmsg`` ->
``scm_send``; the receiver gets them from ``scm_detach_fds``)."""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence


def sendmsg(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """One record with ``fds`` beside it (none: no control message at all)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
        if fds else []
    sock.sendmsg([data], anc)


def received(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in received control messages (a partial trailing int is ignored, as Linux
    never sends one)."""
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return fds.tolist()


def recvmsg(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int], int]:
    """One record of at most ``size`` bytes with at most ``max_fds`` fds: (bytes, the fds
    that arrived -- now the caller's to close --, recvmsg's flags: MSG_TRUNC, MSG_CTRUNC)."""
    raw, anc, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(4 * max_fds))
    return raw, received(anc), flags
