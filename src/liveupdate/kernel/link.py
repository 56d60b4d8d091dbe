"""The kernel's link to the machine: one SOCK_SEQPACKET socket given at process start.

The machine's requests carry ``id`` (answered with it); the kernel's own requests to the
hardware (:meth:`Link.call`: config space, device registers) carry ``req`` and the machine
answers with ``re``. During boot nothing else reads the link, so a call reads its answer
itself; once the kernel's request loop runs it hands answers over (:meth:`Link.route`).
"""

from __future__ import annotations

import errno
import queue
import socket
import threading
from typing import Any

from liveupdate.abi import wire
from liveupdate.errors import LiveUpdateError

MAX_RECORD = wire.SEQPACKET_BUFFER
CALL_TIMEOUT = 10.0  # seconds the hardware may take to answer (it answers at once)


class Link:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._call_lock = threading.Lock()  # one hardware access at a time, as one bus
        self._answers: queue.Queue[dict[str, Any]] | None = None
        self._next = 0

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        with self._send_lock:
            self.sock.send(wire.pack(header, payload))

    def recv(self) -> tuple[dict[str, Any], bytes] | None:
        msg = self.sock.recv(MAX_RECORD)
        if not msg:
            return None
        return wire.unpack(msg)

    def start_routing(self) -> None:
        """From now on the request loop reads the link and passes answers to :meth:`call`."""
        if self._answers is None:
            self._answers = queue.Queue()

    def route(self, header: dict[str, Any]) -> bool:
        """Whether ``header`` is an answer to a call (then handed to it)."""
        if "re" not in header or "id" in header or self._answers is None:
            return False
        self._answers.put(header)
        return True

    def call(self, header: dict[str, Any]) -> dict[str, Any]:
        """One request to the hardware and its answer; an ``errno`` answer is raised."""
        with self._call_lock:
            self._next += 1
            rid = self._next
            self.send({**header, "req": rid})
            while True:
                got = self._answer()
                if got.get("re") == rid:
                    break
        if got.get("errno"):
            raise LiveUpdateError(err=int(got["errno"]), msg=str(got.get("message", "")))
        return got

    def _answer(self) -> dict[str, Any]:
        if self._answers is not None:
            try:
                return self._answers.get(timeout=CALL_TIMEOUT)
            except queue.Empty:
                raise LiveUpdateError(err=errno.ETIMEDOUT, msg="the machine did not "
                                      "answer a hardware access") from None
        got = self.recv()
        if got is None:
            raise LiveUpdateError(err=errno.EIO, msg="the machine is gone")
        return got[0]
