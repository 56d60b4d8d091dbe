"""luod's client protocol, version 1 (docs/luod-protocol.md shows an example exchange).

A client connects to luod's Unix socket (SOCK_SEQPACKET). Every message is one record: a
UTF-8 JSON object, with file descriptors beside it as SCM_RIGHTS. Requests carry ``"op"``
and an ``"id"`` the reply repeats; a reply is ``{"id", "ok": true, ...}`` or ``{"id", "ok":
false, "errno": "EPERM", "error": "one line"}``. luod also sends events without an id
(``{"event": "prepare"}``, ``"freeze"``, ``"cancel"``) that a client answers with
``{"op": "ack", "event": ...}``. The first request must be ``hello`` with ``"v": 1`` and the
client's name; the client is the pair (its uid from SO_PEERCRED, that name).

Everything received is validated: a record that is not a JSON object within
:data:`MAX_MESSAGE` bytes, or carries more than :data:`MAX_FDS` fds, is refused (its fds
closed), never half-read.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from liveupdate.errors import LiveUpdateError

VERSION = 1
MAX_MESSAGE = 64 << 10
MAX_FDS = 8
SOCKET_ENV = "LUOD_SOCKET"
ERRNO = {name: num for num, name in errno.errorcode.items()}  # errno names on the wire
HOST_SOCKET = "/run/luod/luod.sock"


def socket_path(cmdline: str) -> str:
    """Where luod listens: ``$LUOD_SOCKET``; on the emulated machine the machine's run
    folder (``lu.run=`` on its kernel's command line: stable across kernels, unlike a
    kernel's per-boot folder); else :data:`HOST_SOCKET`."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    return next((w[7:] + "/luod.sock" for w in cmdline.split() if w.startswith("lu.run=")),
                HOST_SOCKET)


def service_socket(cmdline: str, service: str) -> str:
    """A service's control socket beside luod's (the VMMs', the cache's)."""
    return os.path.join(os.path.dirname(socket_path(cmdline)), f"{service}.sock")


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
         ) -> None:
    raw = json.dumps(msg, separators=(",", ":")).encode()
    if len(raw) > MAX_MESSAGE:
        raise LiveUpdateError(err=errno.EMSGSIZE, msg=f"luod message of {len(raw)} bytes")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([raw], anc)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message, or None at the end of the connection. LiveUpdateError (EPROTO) for a
    malformed one; its fds are closed."""
    raw, anc, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(4 * MAX_FDS))
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not raw and not fds:
        return None
    if flags & socket.MSG_CTRUNC and len(fds) < MAX_FDS:
        # Linux also truncates when the receiver runs out of fd slots while installing
        # them (scm_detach_fds stops early): fewer than MAX_FDS arrived -- not a peer error
        for fd in fds:
            os.close(fd)
        raise LiveUpdateError(err=errno.EMFILE, msg="luod has no free file descriptor for "
                              "the fds sent with this message")
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(raw) > MAX_MESSAGE:
            raise ValueError("message or its fds too large")
        msg = json.loads(raw)
        if not isinstance(msg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        for fd in fds:
            os.close(fd)
        raise LiveUpdateError(err=errno.EPROTO, msg=f"luod protocol: {e}") from e
    return msg, fds.tolist()


def field(msg: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = msg.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"luod protocol: {name!r} must be "
                              f"{kind.__name__}")
    return value


def ask(path: str, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
    """One request to a service speaking this framing (luod's admin side, a VMM's or the
    cache's control socket); its reply, or LiveUpdateError with the service's errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            send(s, {"op": op, "id": 1, **fields})
            got = recv(s)
        except OSError as e:
            raise LiveUpdateError(err=e.errno or errno.EIO, msg=f"{path}: {e}") from e
    if got is None:
        raise LiveUpdateError(err=errno.ECONNRESET, msg=f"{path} hung up")
    for fd in got[1]:
        os.close(fd)
    reply = got[0]
    if not reply.get("ok"):
        raise LiveUpdateError(err=ERRNO.get(str(reply.get("errno")), errno.EIO),
                              msg=str(reply.get("error")))
    return reply


Handler = Callable[[dict[str, Any]], dict[str, Any]]


def listen(path: str, mode: int = 0o600) -> socket.socket:
    """A service's socket, bound and listening (bind before announcing the service: then it
    answers as soon as it says it is up)."""
    if os.path.exists(path):
        os.unlink(path)  # a previous instance's
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    os.chmod(path, mode)
    srv.listen(16)
    return srv


def serve(srv: socket.socket, handle: Handler) -> None:
    """Answer requests forever, one thread per connection: ``handle(msg)`` returns the
    reply's fields or raises LiveUpdateError (the error envelope); received fds are closed."""
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_answer, args=(conn, handle), daemon=True).start()


def _answer(conn: socket.socket, handle: Handler) -> None:
    with conn:
        while True:
            try:
                got = recv(conn)
            except (OSError, LiveUpdateError):
                return
            if got is None:
                return
            msg, fds = got
            for fd in fds:
                os.close(fd)
            try:
                reply = {"ok": True, **handle(msg)}
            except LiveUpdateError as e:
                reply = {"ok": False, "errno": e.errno_name, "error": e.message}
            try:
                send(conn, {"id": msg.get("id"), **reply})
            except OSError:
                return
