"""The kernel's link to the machine: one SOCK_SEQPACKET socket given at process start."""

from __future__ import annotations

import socket
import threading
from typing import Any

from liveupdate.abi import wire

MAX_RECORD = wire.SEQPACKET_BUFFER


class Link:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        with self._send_lock:
            self.sock.send(wire.pack(header, payload))

    def recv(self) -> tuple[dict[str, Any], bytes] | None:
        msg = self.sock.recv(MAX_RECORD)
        if not msg:
            return None
        return wire.unpack(msg)
