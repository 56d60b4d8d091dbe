"""``kvcache``: not only VMs -- an in-memory key-value cache whose data lives in a memfd and
survives a live update through luod, answering requests on a socket right after it.

    python -m liveupdate.userspace.kvcache NAME [--memory 16M]

The memfd holds an open-addressing table of fixed slots (key up to 56 bytes, value up to 192
bytes, FNV-1a hashing, linear probing). Requests on ``<luod socket folder>/kvcache-NAME.sock``
(luod's framing): ``{"op":"put","key","value"}``, ``{"op":"get","key"}``, ``{"op":"stats"}``.
Puts are refused (EBUSY) between prepare and the kexec -- limited mode, as the VMM's.
"""

from __future__ import annotations

import argparse
import errno
import os
import struct
import sys
from typing import Any

from liveupdate.client.backends import open_backend
from liveupdate.client.luod import LuodClient, connect
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints, framing, service

TOKEN = 1
SLOT = 256
KEY_MAX, VALUE_MAX = 56, 192
HEAD = struct.Struct("<BBH4x")  # used, key length, value length


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


class Table:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.slots = len(view) // SLOT

    def _find(self, key: bytes) -> tuple[int, bool]:
        i = fnv1a(key) % self.slots
        for _ in range(self.slots):
            used, klen, _ = HEAD.unpack_from(self.view, i * SLOT)
            if not used:
                return i, False
            if bytes(self.view[i * SLOT + 8 : i * SLOT + 8 + klen]) == key:
                return i, True
            i = (i + 1) % self.slots
        raise LiveUpdateError(err=errno.ENOSPC, msg="kvcache: the table is full")

    def put(self, key: bytes, value: bytes) -> None:
        if not 0 < len(key) <= KEY_MAX or len(value) > VALUE_MAX:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"keys are 1-{KEY_MAX} bytes, values "
                                  f"up to {VALUE_MAX}")
        i, _ = self._find(key)
        off = i * SLOT
        self.view[off + 8 : off + 8 + len(key)] = key
        self.view[off + 64 : off + 64 + len(value)] = value
        HEAD.pack_into(self.view, off, 1, len(key), len(value))  # last: the slot is whole

    def get(self, key: bytes) -> bytes | None:
        i, found = self._find(key)
        if not found:
            return None
        _, _, vlen = HEAD.unpack_from(self.view, i * SLOT)
        return bytes(self.view[i * SLOT + 64 : i * SLOT + 64 + vlen])

    def count(self) -> int:
        return sum(self.view[i * SLOT] for i in range(self.slots))


class Cache:
    def __init__(self, name: str, size: int) -> None:
        self.backend = open_backend()
        self.limited = False
        self.client = self._connect(name)
        if self.client.restore:
            self.fd = self.client.retrieve(TOKEN)
        else:
            self.fd = self.backend.memfd_create(f"kvcache-{name}")
            self.backend.ftruncate(self.fd, size)
        self.mapping = self.backend.map(self.fd, size)
        self.table = Table(self.mapping.view)
        self.restored = self.client.restore
        if self.restored:
            self.client.done()

    def _connect(self, name: str) -> LuodClient:
        return connect(name, backend=self.backend, on_prepare=self._prepare,
                       on_cancel=self._cancel)

    def _prepare(self, c: LuodClient) -> None:
        self.limited = True
        c.preserve(self.fd, TOKEN)

    def _cancel(self, c: LuodClient, reason: str) -> None:
        self.limited = False

    @property
    def handlers(self) -> service.Handlers:
        """The control socket's requests (:func:`liveupdate.ipc.service.serve`)."""
        return {"stats": self._stats, "get": self._get, "put": self._put}

    def _stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"keys": self.table.count(), "restored": self.restored, "pid": os.getpid(),
                "limited": self.limited}

    def _get(self, msg: dict[str, Any]) -> dict[str, Any]:
        value = self.table.get(framing.field(msg, "key", str).encode())
        return {"found": value is not None,
                "value": value.decode(errors="replace") if value is not None else None}

    def _put(self, msg: dict[str, Any]) -> dict[str, Any]:
        key = framing.field(msg, "key", str).encode()
        if self.limited:
            raise LiveUpdateError(err=errno.EBUSY, msg="kvcache: a live update is under "
                                  "way; writes resume after it")
        self.table.put(key, framing.field(msg, "value", str).encode())
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvcache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--memory", type=lambda s: int(s[:-1]) << 20 if s.upper().endswith("M")
                    else int(s), default=16 << 20, help="table size (bytes, or NM)")
    args = ap.parse_args(argv)
    try:
        cache = Cache(args.name, args.memory)
        path = endpoints.service_socket(cache.backend.cmdline(), f"kvcache-{args.name}")
        srv = service.listen(path)  # bound before announced: it answers once it says so
        print(f"kvcache {args.name}: {'restored' if cache.restored else 'started'} with "
              f"{cache.table.count()} keys, serving {path}", flush=True)
        service.serve(srv, cache.handlers, "kvcache: ")
    except (LiveUpdateError, OSError, ValueError) as e:
        print(f"kvcache {args.name}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
