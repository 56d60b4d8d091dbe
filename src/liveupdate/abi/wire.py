"""Message framing for the syscall transport and the machine's links.

A message is ``u32 header_len (LE) | header (UTF-8 JSON object) | payload bytes``. It travels
as one SOCK_SEQPACKET record (the syscall transport, the machine-kernel link) or with an
extra ``u32`` total length in front on stream sockets (the control socket). File descriptors
ride beside it as SCM_RIGHTS. Everything received is validated: a bad frame is AbiError.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from liveupdate.errors import AbiError, LiveUpdateError

T = TypeVar("T")

MAX_MESSAGE = 64 << 20
# A SOCK_SEQPACKET record must fit the sender's socket buffer: at most net.core.wmem_max
# (often 208 KiB). seqpacket_pair() asks for SEQPACKET_BUFFER; bulk data moves in pieces of
# at most IO_PIECE so that it fits even where the system caps the buffer at its default.
SEQPACKET_BUFFER = 4 << 20
IO_PIECE = 128 << 10
_LEN = struct.Struct("<I")


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected SOCK_SEQPACKET pair with buffers as large as the system allows."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in pair:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SEQPACKET_BUFFER)  # capped by the system
    return pair


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    try:
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as e:  # NaN/Infinity, an int past 4300 digits
        raise AbiError(msg=f"message header cannot be sent: {e}") from e
    msg = _LEN.pack(len(head)) + head + payload
    if len(msg) > MAX_MESSAGE:
        raise AbiError(msg=f"message of {len(msg)} bytes exceeds {MAX_MESSAGE}")
    return msg


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def unpack(msg: bytes) -> tuple[dict[str, Any], bytes]:
    if len(msg) < 4:
        raise AbiError(msg="message shorter than its header length")
    (n,) = _LEN.unpack_from(msg)
    if 4 + n > len(msg):
        raise AbiError(msg=f"message header length {n} exceeds the {len(msg)}-byte message")
    try:
        header = json.loads(msg[4 : 4 + n], parse_constant=_no_constant)
    except ValueError as e:  # not JSON, not UTF-8, NaN/Infinity, an int past 4300 digits
        raise AbiError(msg=f"message header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise AbiError(msg="message header is not a JSON object")
    return header, bytes(msg[4 + n :])


# -- requests and the reply envelope ------------------------------------------------------

@dataclass
class Message:
    """One request or reply: a JSON header, payload bytes, and file descriptors beside them."""

    header: dict[str, Any]
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)


Ctx = TypeVar("Ctx")
Handler = Callable[[Ctx, Message], Message]


def arg(msg: Message, name: str, kind: type[T], default: T | None = None) -> T:
    """A typed request argument; a missing or mistyped one is EINVAL, never a KeyError."""
    value = msg.header.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AbiError(msg=f"{msg.header.get('op')}: argument {name!r} must be {kind.__name__}")
    return value


# resource exhaustion, which any code path may meet: an errno for the caller, not an oops
EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})


def dispatch(table: Mapping[str, Handler[Ctx]], ctx: Ctx, msg: Message, *, server: str,
             on_bug: Callable[[str], None]) -> Message:
    """Run the handler named by ``msg.header["op"]`` and make the reply envelope.

    The one request helper of every server (machine control socket, kernel link, syscalls):
    success is ``errno: 0`` plus the handler's header; a :class:`LiveUpdateError` is its
    errno and message; running out of fds or memory anywhere in the handler (an OSError of
    :data:`EXHAUSTION`, e.g. a lazy import that cannot open its file) is that errno, not a
    bug; any other exception is a bug in the server -- ``on_bug`` reports it (an oops on the
    console) and the caller gets EFAULT, but the server stays up.
    """
    op = msg.header.get("op")
    try:
        handler = table.get(op) if isinstance(op, str) else None
        if handler is None:
            raise LiveUpdateError(err=errno.ENOSYS, msg=f"{server}: unknown operation {op!r}")
        reply = handler(ctx, msg)
        reply.header = {**reply.header, "errno": 0}
        return reply
    except LiveUpdateError as e:
        return Message({"errno": e.errno, "message": e.message})
    except Exception as e:
        if isinstance(e, OSError) and e.errno in EXHAUSTION:
            return Message({"errno": e.errno, "message": f"{server} {op}: {e.strerror}"})
        on_bug(f"BUG: {type(e).__name__} in {server} {op!r}: {e}")
        return Message({"errno": errno.EFAULT, "message": f"{server} oops: {e}"})
