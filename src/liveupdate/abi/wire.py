"""Message framing for the syscall transport and the machine's links.

A message is ``u32 header_len (LE) | header (UTF-8 JSON object) | payload bytes``. It travels
as one SOCK_SEQPACKET record (the syscall transport, the machine-kernel link) or with an
extra ``u32`` total length in front on stream sockets (the control socket). File descriptors
ride beside it as SCM_RIGHTS. Everything received is validated: a bad frame is AbiError.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from liveupdate.errors import AbiError

MAX_MESSAGE = 64 << 20
_LEN = struct.Struct("<I")


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    msg = _LEN.pack(len(head)) + head + payload
    if len(msg) > MAX_MESSAGE:
        raise AbiError(f"message of {len(msg)} bytes exceeds {MAX_MESSAGE}")
    return msg


def unpack(msg: bytes) -> tuple[dict[str, Any], bytes]:
    if len(msg) < 4:
        raise AbiError("message shorter than its header length")
    (n,) = _LEN.unpack_from(msg)
    if 4 + n > len(msg):
        raise AbiError(f"message header length {n} exceeds the {len(msg)}-byte message")
    try:
        header = json.loads(msg[4 : 4 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AbiError(f"message header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise AbiError("message header is not a JSON object")
    return header, bytes(msg[4 + n :])
