"""A request server as a handler table (op -> handler) and the one-shot client ``ask``.

The VMMs and the cache serve through :func:`serve`; luod has its own connection loop
(clients stay connected and receive events) but dispatches the same way: look the op up in
a table, run it, turn the result or its LiveUpdateError into the envelope
(:func:`liveupdate.ipc.envelope.run`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import envelope, framing

Handler = Callable[[dict[str, Any]], dict[str, Any]]
Handlers = Mapping[str, Handler]


def ask(path: str, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
    """One request to a service speaking this framing (luod's admin side, a VMM's or the
    cache's control socket); its reply, or LiveUpdateError with the service's errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            framing.send(s, {"op": op, "id": 1, **fields})
            got = framing.recv(s)
        except OSError as e:
            raise LiveUpdateError(err=e.errno or errno.EIO, msg=f"{path}: {e}") from e
    if got is None:
        raise LiveUpdateError(err=errno.ECONNRESET, msg=f"{path} hung up")
    for fd in got[1]:
        os.close(fd)
    return envelope.check(got[0])


def listen(path: str, mode: int = 0o600) -> socket.socket:
    """A service's socket, bound and listening (bind before announcing the service: then it
    answers as soon as it says it is up)."""
    return bound(path, mode, 16)


def bound(path: str, mode: int, backlog: int) -> socket.socket:
    """A SOCK_SEQPACKET socket listening at ``path`` -- bound under a temporary name and
    renamed into place, replacing a previous instance's: the name appears only once it
    answers (its clients wait for it with :mod:`liveupdate.ipc.appear`). The temporary name
    is no longer than a service's own (``.PID`` in the same folder): a path that fits
    ``sun_path`` must not fail for its temporary."""
    tmp = os.path.join(os.path.dirname(path), f".{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        srv.bind(tmp)
        os.chmod(tmp, mode)
        srv.listen(backlog)
        os.rename(tmp, path)
    except OSError:
        srv.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return srv


def lookup(handlers: Mapping[str, Any], msg: dict[str, Any], who: str = "") -> Any:
    """The handler of the request's op; EOPNOTSUPP for an unknown one."""
    op = msg.get("op")
    handler = handlers.get(op) if isinstance(op, str) else None
    if handler is None:
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"{who}unknown op {op!r}")
    return handler


def dispatch(handlers: Handlers, msg: dict[str, Any], who: str = "") -> dict[str, Any]:
    """One request through the table, as the envelope."""
    return envelope.run(msg.get("id"), lambda: lookup(handlers, msg, who)(msg))


def serve(srv: socket.socket, handlers: Handlers, who: str = "") -> None:
    """Answer requests forever, one thread per connection; received fds are closed. ``who``
    prefixes the unknown-op error (``"kvcache: "``). Ends when the listening socket is
    closed (its owner shut the service down)."""
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            if srv.fileno() == -1:
                return
            raise
        threading.Thread(target=_answer, args=(conn, handlers, who), daemon=True).start()


def _answer(conn: socket.socket, handlers: Handlers, who: str) -> None:
    with conn:
        while True:
            try:
                got = framing.recv(conn)
            except (OSError, LiveUpdateError):
                return
            if got is None:
                return
            msg, fds = got
            for fd in fds:
                os.close(fd)
            try:
                reply = dispatch(handlers, msg, who)
                try:
                    framing.send(conn, reply)
                except LiveUpdateError as e:  # too long for a record: said, not a hang-up
                    framing.send(conn, envelope.error(msg.get("id"), e))
            except OSError:
                return
