"""The client side of luod's protocol (:mod:`liveupdate.luod.protocol`): one ``preserve(fd,
token)`` / ``retrieve(token)`` API whatever the kernel's uAPI generation.

On 6.19+ luod hands the client a session at ``prepare`` and the client preserves into it
itself (its memcg is charged, as luo-agent intends); after the kexec luod hands back the
retrieved session and the client retrieves from it. On v3 only luod has the device: the
client sends its fds to luod, which preserves them, and asks luod for them afterwards.

Events arrive on a background thread and run the client's callbacks in order: ``on_prepare``
(preserve everything, enter limited mode), ``on_freeze`` (pause, final writes), ``on_cancel``
(resume; on 6.19 the session is closed first, which drops what it held). The acknowledgement
is sent when the callback returns; a callback that raises does not acknowledge, and luod
cancels the update when the barrier times out. If luod goes away mid-update the client
behaves as on ``cancel`` -- unless it already acknowledged ``freeze``: then the kexec is
under way and the client stays paused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from liveupdate.abi.uapi import Gen
from liveupdate.client.backends import Backend, open_backend
from liveupdate.client.device import Session
from liveupdate.errors import LiveUpdateError
from liveupdate.luod import protocol

Callback = Callable[["LuodClient"], None]


class LuodClient:
    def __init__(self, name: str, *, path: str | None = None, backend: Backend | None = None,
                 on_prepare: Callback | None = None, on_freeze: Callback | None = None,
                 on_cancel: Callable[[LuodClient, str], None] | None = None,
                 on_phase: Callable[[dict[str, Any]], None] | None = None,
                 admin: bool = False) -> None:
        self.name = name
        self._backend = backend
        self.on_prepare, self.on_freeze, self.on_cancel = on_prepare, on_freeze, on_cancel
        self.on_phase = on_phase
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = path or protocol.socket_path(self.backend.cmdline())
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise LiveUpdateError(err=e.errno or errno.ECONNREFUSED,
                                  msg=f"luod at {path}: {e.strerror}") from e
        self._lock = threading.Lock()
        self._next = 1
        self._waiting: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._events: queue.Queue[tuple[dict[str, Any], list[int]] | None] = queue.Queue()
        self.session: Session | None = None  # outgoing, handed over at prepare (6.19+)
        self.retrieved: Session | None = None  # the previous kernel's, after the kexec
        self.lost = threading.Event()
        self.in_update = False
        self.frozen = False  # acknowledged freeze: only an explicit cancel resumes
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._dispatch, daemon=True).start()
        hello, fds = self.request("hello", v=protocol.VERSION, name=name,
                                  role="admin" if admin else "client")
        self.generation: str = hello["generation"]
        self.phase: str = hello["phase"]
        self.restore: bool = hello["restore"]
        self.tokens: list[int] = hello.get("tokens", [])
        if fds:
            self.retrieved = Session(self.backend, self.gen, fds[0], name)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend()
        return self._backend

    @property
    def gen(self) -> Gen:
        """The kernel's uAPI generation (from luod's hello, which read it from uname)."""
        return Gen(self.generation)

    # -- requests -------------------------------------------------------------------------
    def request(self, op: str, fds: tuple[int, ...] = (), **args: Any
                ) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            rid = self._next
            self._next += 1
            slot: tuple[threading.Event, list[Any]] = (threading.Event(), [])
            self._waiting[rid] = slot
            try:
                protocol.send(self.sock, {"op": op, "id": rid, **args}, fds)
            except OSError as e:
                del self._waiting[rid]
                raise LiveUpdateError(err=errno.EPIPE, msg=f"luod: {e.strerror}") from e
        slot[0].wait()
        if not slot[1]:
            raise LiveUpdateError(err=errno.ECONNRESET, msg=f"luod went away during {op}")
        reply, got = slot[1]
        if not reply.get("ok"):
            for fd in got:
                os.close(fd)
            raise LiveUpdateError(err=protocol.ERRNO.get(str(reply.get("errno")), errno.EIO),
                                  msg=str(reply.get("error", "luod refused")))
        return reply, got

    def _read(self) -> None:
        try:
            while True:
                got = protocol.recv(self.sock)
                if got is None:
                    break
                msg, fds = got
                slot = self._waiting.pop(msg["id"], None) if isinstance(msg.get("id"), int) \
                    else None
                if slot is not None:
                    slot[1].extend([msg, fds])
                    slot[0].set()
                elif "event" in msg:
                    self._events.put((msg, fds))
                else:
                    for fd in fds:
                        os.close(fd)
        except (OSError, LiveUpdateError):
            pass
        finally:
            self.lost.set()
            for slot in list(self._waiting.values()):
                slot[0].set()
            self._events.put(None)

    def _ack(self, event: str) -> None:
        try:
            protocol.send(self.sock, {"op": "ack", "event": event})
        except OSError:
            self.lost.set()

    def _dispatch(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                # luod gone while preparing: the update is off, resume. Gone after freeze:
                # that is the kexec under way -- stay paused (resuming now would let the
                # workload run past the state it just saved).
                if self.in_update and not self.frozen:
                    self._cancelled("luod went away")
                return
            msg, fds = item
            event = msg.get("event")
            try:
                if event == "prepare":
                    self.in_update = True
                    if fds:
                        self.session = Session(self.backend, self.gen, fds[0], self.name)
                    if self.on_prepare:
                        self.on_prepare(self)
                    self._ack("prepare")
                elif event == "freeze":
                    if self.on_freeze:
                        self.on_freeze(self)
                    self.frozen = True
                    self._ack("freeze")
                elif event == "cancel":
                    self._cancelled(str(msg.get("reason", "")))
                elif event == "phase" and self.on_phase:
                    self.on_phase(msg)
            except Exception as e:  # a failing callback: no acknowledgement, luod cancels
                print(f"luod client {self.name}: {event}: {e}", flush=True)

    def _cancelled(self, reason: str) -> None:
        self.in_update = self.frozen = False
        if self.session is not None:
            self.session.close()  # the 6.19 abort path: closing the session unpreserves
            self.session = None
        if self.on_cancel:
            self.on_cancel(self, reason)

    # -- the API --------------------------------------------------------------------------
    def preserve(self, fd: int, token: int) -> None:
        """Keep ``fd`` across the coming kexec under ``token`` (this client's namespace)."""
        if self.gen is Gen.V3:
            self.request("preserve", (fd,), token=token)
            return
        if self.session is None:
            raise LiveUpdateError(err=errno.EBUSY, msg="no session yet: preserve inside "
                                  "on_prepare, when luod hands one over")
        self.session.preserve_fd(fd, token)

    def retrieve(self, token: int) -> int:
        """Get back, after the kexec, what this client preserved under ``token``."""
        if self.gen is Gen.V3:
            return self.request("retrieve", token=token)[1][0]
        if self.retrieved is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"{self.name} has nothing from the "
                                  "previous kernel")
        return self.retrieved.retrieve_fd(token)

    def done(self) -> None:
        """Everything is restored: luod may FINISH once every client is done."""
        self.request("done")

    def status(self) -> dict[str, Any]:
        return self.request("status")[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already gone
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def connect(name: str, timeout: float = 60.0, **kw: Any) -> LuodClient:
    """A client that waits for luod to listen (services start beside it after a kexec)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return LuodClient(name, **kw)
        except LiveUpdateError as e:
            if time.monotonic() > deadline or e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
        time.sleep(0.05)  # luod is starting
