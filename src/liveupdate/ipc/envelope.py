"""The one reply envelope of the services: ``{"id", "ok": true, ...fields}`` or ``{"id",
"ok": false, "errno": "EPERM", "error": "one line"}``.

The errno travels by **name** (``errno.errorcode``), never by number: names are the same on
every architecture and readable in a capture; a name this host does not know becomes EIO.
(The kernel link of the emulated machine, :mod:`liveupdate.abi.wire`, is a syscall
transport, not a service: it carries numbers as a real syscall does.)
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from liveupdate.errors import LiveUpdateError

ERRNO = {name: num for num, name in errno.errorcode.items()}  # errno names on the wire


def ok(rid: Any, fields: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "ok": True, **fields}


def failure(e: LiveUpdateError) -> dict[str, Any]:
    """The error envelope without an id (the record it answers had none to repeat)."""
    return {"ok": False, "errno": e.errno_name, "error": e.message}


def error(rid: Any, e: LiveUpdateError) -> dict[str, Any]:
    return {"id": rid, **failure(e)}


def run(rid: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The one helper of every request server: the handler's result, or its LiveUpdateError,
    as the envelope. An OSError the handler did not expect (EMFILE, ENOSPC, EIO from the
    host) is answered with its errno too: the peer learns why, and the connection lives."""
    try:
        return ok(rid, fn())
    except LiveUpdateError as e:
        return error(rid, e)
    except OSError as e:
        return error(rid, LiveUpdateError.from_os(e))


def check(reply: dict[str, Any], default: str = "refused") -> dict[str, Any]:
    """A reply, or the LiveUpdateError it carries (errno by name)."""
    if not reply.get("ok"):
        raise LiveUpdateError(err=ERRNO.get(str(reply.get("errno")), errno.EIO),
                              msg=str(reply.get("error", default)))
    return reply
