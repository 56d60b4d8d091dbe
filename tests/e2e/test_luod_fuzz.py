"""luod's client boundary under fuzzing, on a real machine: malformed JSON, wrong types,
messages over the size limit, fds where none are expected and none where they are, unknown
versions and roles. Every record gets a well-formed refusal or a well-formed answer, luod
keeps serving, and it holds no more fds afterwards than before."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveupdate.abi import image
from liveupdate.client.update import luod_status
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import envelope, framing, service
from liveupdate.ipc import fds as fdpass
from liveupdate.machine.client import start

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
OPS = st.sampled_from(["hello", "ack", "preserve", "retrieve", "done", "status", "sessions",
                       "load", "update", "cancel", "wait", "nope", ""])
MESSAGE = st.fixed_dictionaries(
    {"op": OPS | JSON},
    optional={"id": JSON, "v": st.sampled_from([1, 0, 2, "1", None]) | JSON,
              "name": st.text(max_size=50) | JSON, "role": st.sampled_from(["admin", "client"])
              | JSON, "token": JSON, "event": st.sampled_from(["prepare", "freeze"]) | JSON,
              "image": st.text(max_size=30) | JSON, "cmdline": JSON, "release": JSON,
              "timeout": st.just(0) | JSON})
RECORD = st.one_of(MESSAGE.map(lambda m: json.dumps(m).encode()),
                   JSON.map(lambda v: json.dumps(v).encode()),
                   st.binary(max_size=256),
                   st.integers(framing.MAX_MESSAGE - 8, framing.MAX_MESSAGE + 64)
                   .map(lambda n: b'{"op":"status","pad":"' + b"x" * n + b'"}'))


@pytest.fixture(scope="module")
def luod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One machine running luod for the whole module; its socket's path."""
    folder = tmp_path_factory.mktemp("fuzz") / "m"
    disk = folder / "disk"
    (disk / "images").mkdir(parents=True)
    (disk / "images" / "6.19.img").write_bytes(image.KernelImage().encode())
    (disk / "services").write_text(f"@restart {sys.executable} -m liveupdate.cli.luod\n")
    proc, m = start(str(folder), memory=1 << 30, cmdline="kho=on liveupdate=on",
                    image="images/6.19.img", log=str(folder) + ".log")
    try:
        m.booted(60)
        m.wait("luod: LUO .* listening")
        yield m.dir + "/run/luod.sock"
    finally:
        m.shutdown()
        proc.wait(30)


PROBE = {"op": "status", "id": "probe"}


def _exchange(path: str, hello: bool, raw: bytes, nfds: int) -> list[dict[str, Any]] | None:
    """One record (with ``nfds`` memfds beside it) on a fresh connection, then a probe; luod's
    replies before the probe's (an ``ack`` gets none), or None when luod hung up (a refused
    hello) or the record cannot be sent at all (over the socket's own size)."""
    fds = [os.memfd_create("fuzz") for _ in range(nfds)]
    replies: list[dict[str, Any]] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(path)
            if hello:
                framing.send(s, {"op": "hello", "id": 0, "v": 1, "name": "fuzz",
                                 "role": "admin"})
                framing.recv(s)
            try:
                fdpass.sendmsg(s, raw, fds)
                framing.send(s, PROBE)
            except OSError as e:
                assert e.errno in (errno.EMSGSIZE, errno.EPIPE), e
                return None
            while True:
                try:
                    got = framing.recv(s)
                except LiveUpdateError as e:
                    raise AssertionError(f"luod sent a malformed record: {e}") from e
                except ConnectionResetError:
                    return None
                if got is None:
                    return None
                reply, back = got
                for fd in back:
                    os.close(fd)
                if reply.get("id") == "probe":
                    return replies
                replies.append(reply)
    finally:
        for fd in fds:
            os.close(fd)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(hello=st.booleans(), raw=RECORD, nfds=st.integers(0, 3))
def test_every_record_gets_a_well_formed_answer(luod: str, hello: bool, raw: bytes,
                                                nfds: int) -> None:
    replies = _exchange(luod, hello, raw, nfds)
    if replies is None:
        return
    assert len(replies) <= 1, replies  # one answer per record, none for an ack
    for reply in replies:
        assert isinstance(reply.get("ok"), bool), reply
        if not reply["ok"]:
            assert reply["errno"] in envelope.ERRNO and isinstance(reply["error"], str), reply
            assert "\n" not in reply["error"], reply


def test_luod_serves_on_and_leaks_no_fds(luod: str) -> None:
    pid = int(luod_status(luod)["pid"])
    before = _fds(pid)
    for i in range(40):  # fds where none are expected, on every kind of request
        _exchange(luod, bool(i % 2), json.dumps({"op": ["status", "ack", "nope"][i % 3],
                                                 "id": i}).encode(), 3)
    deadline = time.monotonic() + 10
    while _fds(pid) > before and time.monotonic() < deadline:
        time.sleep(0.05)  # luod's connection threads close their sockets after our EOF
    assert _fds(pid) <= before  # (the baseline may still hold _status's connection)
    st = luod_status(luod)
    assert st["phase"] == "normal" and int(st["pid"]) == pid  # the same luod, serving
    with pytest.raises(LiveUpdateError) as e:
        service.ask(luod, "status")  # and still refusing an admin op before hello
    assert e.value.errno == errno.EPROTO
