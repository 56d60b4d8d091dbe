"""luod's registry: who owns what, carried across the kexec by LUO itself.

It lives in a fixed-size memfd that luod preserves under its own token (v3) or in its own
session (6.19+) -- never on disk, so it can never go stale. Layout: ``b"LUODREG1"``, ``u32``
length, ``u32`` CRC-32 of the payload, then the payload (UTF-8 JSON), zero-padded to
:data:`SIZE`. The next luod treats it as hostile: any mismatch is one error and luod starts
with an empty registry (what nobody claims is reclaimed at FINISH).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from liveupdate.errors import AbiError

MAGIC = b"LUODREG1"
HEADER = struct.Struct("<8sII")
SIZE = 64 << 10


@dataclass
class ClientRecord:
    uid: int
    name: str
    tokens: dict[int, int] = field(default_factory=dict)  # client token -> global (v3)
    session: str = ""  # its session's name (6.19+)


@dataclass
class Registry:
    generation: str
    update: int = 0  # how many live updates this chain of luods has done
    clients: list[ClientRecord] = field(default_factory=list)
    timeline: dict[str, float] = field(default_factory=dict)  # phase -> wall-clock time

    def encode(self) -> bytes:
        payload = json.dumps({
            "generation": self.generation, "update": self.update, "timeline": self.timeline,
            "clients": [{"uid": c.uid, "name": c.name, "session": c.session,
                         "tokens": {str(k): v for k, v in c.tokens.items()}}
                        for c in self.clients]}, separators=(",", ":")).encode()
        if HEADER.size + len(payload) > SIZE:
            raise AbiError(msg=f"luod registry of {len(payload)} bytes does not fit {SIZE}")
        return (HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload).ljust(
            SIZE, b"\0")


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
        raise AbiError(msg=f"luod registry: {what} is not a u64")
    return v


def decode(raw: bytes) -> Registry:
    if len(raw) < HEADER.size:
        raise AbiError(msg="luod registry: shorter than its header")
    magic, n, crc = HEADER.unpack_from(raw)
    if magic != MAGIC or HEADER.size + n > len(raw):
        raise AbiError(msg="luod registry: bad magic or length")
    payload = raw[HEADER.size : HEADER.size + n]
    if zlib.crc32(payload) != crc:
        raise AbiError(msg="luod registry: checksum mismatch")
    try:
        d = json.loads(payload)
        clients = [ClientRecord(_int(c["uid"], "uid"), str(c["name"]),
                                {_int(int(k), "token"): _int(v, "token")
                                 for k, v in dict(c["tokens"]).items()},
                                str(c["session"])) for c in d["clients"]]
        timeline = {str(k): float(v) for k, v in dict(d["timeline"]).items()}
        return Registry(str(d["generation"]), _int(d["update"], "update"), clients, timeline)
    except (ValueError, KeyError, TypeError) as e:
        raise AbiError(msg=f"luod registry: malformed payload ({e})") from e
