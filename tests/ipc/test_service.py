"""The one service protocol: a handler table behind a socket, the errno-by-name envelope,
the SCM_RIGHTS helper."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints, envelope, framing, service
from liveupdate.ipc import fds as fdpass


def test_the_envelope_carries_errno_by_name() -> None:
    e = LiveUpdateError(err=errno.EDQUOT, msg="quota")
    assert envelope.run(3, lambda: {"x": 1}) == {"id": 3, "ok": True, "x": 1}

    def fail() -> dict[str, Any]:
        raise e

    reply = envelope.run(4, fail)
    assert reply == {"id": 4, "ok": False, "errno": "EDQUOT", "error": "quota"}
    with pytest.raises(LiveUpdateError) as got:
        envelope.check(reply)
    assert (got.value.errno, got.value.message) == (errno.EDQUOT, "quota")
    with pytest.raises(LiveUpdateError) as got:
        envelope.check({"ok": False, "errno": "ENOTANERRNO"})
    assert got.value.errno == errno.EIO  # a name this host does not know


def test_an_unexpected_oserror_is_answered_with_its_errno() -> None:
    def fail() -> dict[str, Any]:
        raise OSError(errno.EMFILE, "Too many open files", "/some/module.py")

    assert envelope.run(5, fail) == {"id": 5, "ok": False, "errno": "EMFILE",
                                     "error": "Too many open files: /some/module.py"}


def test_a_handler_table_serves_and_refuses_unknown_ops(tmp_path: Path) -> None:
    path = str(tmp_path / "svc.sock")
    srv = service.listen(path)

    def echo(msg: dict[str, Any]) -> dict[str, Any]:
        return {"n": framing.field(msg, "n", int)}

    threading.Thread(target=service.serve, args=(srv, {"echo": echo}, "svc: "),
                     daemon=True).start()
    try:
        assert service.ask(path, "echo", n=5) == {"id": 1, "ok": True, "n": 5}
        with pytest.raises(LiveUpdateError) as e:
            service.ask(path, "nope")
        assert (e.value.errno, e.value.message) == (errno.EOPNOTSUPP,
                                                    "svc: unknown op 'nope'")
        with pytest.raises(LiveUpdateError) as e:
            service.ask(path, "echo", n=True)  # a bool is not an int
        assert e.value.errno == errno.EINVAL
    finally:
        srv.close()


def test_a_reply_too_long_for_a_record_is_an_errno_and_the_connection_lives(
        tmp_path: Path) -> None:
    path = str(tmp_path / "svc.sock")
    srv = service.listen(path)
    table = {"big": lambda msg: {"x": "y" * framing.MAX_MESSAGE},
             "small": lambda msg: {"x": 1}}
    threading.Thread(target=service.serve, args=(srv, table), daemon=True).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
            c.connect(path)
            framing.send(c, {"op": "big", "id": 1})
            got = framing.recv(c)
            assert got is not None and got[0]["errno"] == "EMSGSIZE", got
            framing.send(c, {"op": "small", "id": 2})
            got = framing.recv(c)
            assert got is not None and got[0] == {"id": 2, "ok": True, "x": 1}
    finally:
        srv.close()


def test_fds_pass_beside_a_record() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        r, w = os.pipe()
        fdpass.sendmsg(a, b"hi", [w])
        os.close(w)
        raw, got, flags = fdpass.recvmsg(b, 16, 4)
        assert raw == b"hi" and len(got) == 1 and not flags
        os.write(got[0], b"x")
        os.close(got[0])
        assert os.read(r, 1) == b"x"
        os.close(r)
        fdpass.sendmsg(a, b"none")
        assert fdpass.recvmsg(b, 16, 4)[:2] == (b"none", [])


def test_socket_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(endpoints.SOCKET_ENV, raising=False)
    assert endpoints.socket_path("quiet lu.run=/m/run") == "/m/run/luod.sock"
    assert endpoints.socket_path("quiet") == endpoints.HOST_SOCKET
    assert endpoints.service_socket("lu.run=/m/run", "vmm-a") == "/m/run/vmm-a.sock"
    monkeypatch.setenv(endpoints.SOCKET_ENV, "/x.sock")
    assert endpoints.socket_path("lu.run=/m/run") == "/x.sock"


def test_a_socket_path_at_the_sun_path_limit_can_be_listened_on(tmp_path: Path) -> None:
    """107 bytes and the NUL fill sun_path: the temporary name a service binds first must
    not be longer than the service's own (a long test folder once lost the cache this way)."""
    name = "kvcache-cache.sock"
    folder = tmp_path / ("d" * (107 - len(str(tmp_path)) - len(name) - 2))
    folder.mkdir()
    path = str(folder / name)
    assert len(path) == 107
    srv = service.listen(path)
    try:
        assert os.path.exists(path) and os.listdir(folder) == [name]
    finally:
        srv.close()
