"""The one request envelope of every server (wire.dispatch): a LiveUpdateError is its errno,
running out of fds or memory is its errno (not a bug), anything else is an oops (EFAULT) that
is reported and leaves the server up."""

from __future__ import annotations

import errno

import pytest

from liveupdate.abi import wire
from liveupdate.errors import LiveUpdateError


def _run(exc: BaseException | None) -> tuple[dict[str, object], list[str]]:
    bugs: list[str] = []

    def handler(ctx: object, msg: wire.Message) -> wire.Message:
        if exc is not None:
            raise exc
        return wire.Message({"fine": True})

    reply = wire.dispatch({"op": handler}, None, wire.Message({"op": "op"}), server="test",
                          on_bug=bugs.append)
    return reply.header, bugs


@pytest.mark.parametrize("exc, want, bug", [
    (None, 0, False),
    (LiveUpdateError(err=errno.EBUSY, msg="busy"), errno.EBUSY, False),
    (OSError(errno.EMFILE, "Too many open files"), errno.EMFILE, False),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), errno.ENOMEM, False),
    (OSError(errno.EBADF, "Bad file descriptor"), errno.EFAULT, True),
    (KeyError("x"), errno.EFAULT, True),
])
def test_envelope(exc: BaseException | None, want: int, bug: bool) -> None:
    header, bugs = _run(exc)
    assert header["errno"] == want
    assert bool(bugs) == bug
