"""The client side of luod's protocol (:mod:`liveupdate.ipc`): one ``preserve(fd,
token)`` / ``retrieve(token)`` API whatever the kernel's uAPI generation.

On 6.19+ luod hands the client a session at ``prepare`` and the client preserves into it
itself (its memcg is charged, as luo-agent intends); after the kexec luod hands back the
retrieved session and the client retrieves from it. On v3 only luod has the device, and on
6.19+ a luod with per-client quotas keeps the sessions to itself (a client holding its own
session fd could preserve past any quota): the client sends its fds to luod, which checks
and preserves them, and asks luod for them afterwards (``mediated``).

Events arrive on a background thread and run the client's callbacks in order: ``on_prepare``
(preserve everything, enter limited mode), ``on_freeze`` (pause, final writes), ``on_cancel``
(resume; on 6.19 the session is closed first, which drops what it held). The acknowledgement
is sent when the callback returns (prepare's names the components of the files preserved,
``files``: luod refuses a next kernel without their handlers before anyone pauses); a
callback that raises refuses the event with its reason (an ``ack`` carrying ``error``), and
luod cancels the update at once, naming it.

If luod goes away the client reconnects (init restarts luod; ``reconnect`` seconds at most)
and says hello again under the same name, so the next update includes it. Mid-update:

* before acknowledging ``freeze`` it resumes at once (on 6.19 luod's death closed the sessions
  it created, which unpreserves; on v3 the device's release cancels);
* after acknowledging ``freeze`` the kexec may be under way, and resuming would let the
  workload run past the state it just saved -- so it stays paused until a luod answers again
  *in this kernel* (a restarted luod: the update did not happen) or the reconnect window ends
  with the client still alive. A reboot stops every process before it kills any
  (``kernel/reboot.py``), so a client that still runs then was not taken through a kexec.

``gone`` is set when luod is lost for good (no reconnect, or the window ended).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from liveupdate.abi.uapi_generation import UapiGeneration, named
from liveupdate.client import faultpoint
from liveupdate.client.backends import Backend, open_backend
from liveupdate.client.device import Session
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import appear, endpoints, envelope, framing

Callback = Callable[["LuodClient"], None]


class ClientState(enum.Enum):
    """Where this client is in an update (its transitions: ``prepare`` -> PREPARED,
    ``freeze`` acknowledged -> FROZEN, cancel or luod lost -> IDLE)."""

    IDLE = "idle"
    PREPARED = "prepared"  # in an update, still running: luod lost means resume
    FROZEN = "frozen"  # acknowledged freeze: only an explicit cancel (or a luod in this
    #                    kernel) resumes -- the kexec may be under way


class LuodClient:
    def __init__(self, name: str, *, path: str | None = None, backend: Backend | None = None,
                 on_prepare: Callback | None = None, on_freeze: Callback | None = None,
                 on_cancel: Callable[[LuodClient, str], None] | None = None,
                 on_phase: Callable[[dict[str, Any]], None] | None = None,
                 admin: bool = False, reconnect: float = 0.0) -> None:
        self.name = name
        self._backend = backend
        self.on_prepare, self.on_freeze, self.on_cancel = on_prepare, on_freeze, on_cancel
        self.on_phase = on_phase
        self.path = path or endpoints.socket_path(self.backend.cmdline())
        self.role = "admin" if admin else "client"
        self.reconnect = reconnect
        self.files: set[str] = set()  # this update's preserved files' components
        self._lock = threading.Lock()
        self._next = 1
        self._waiting: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._events: queue.Queue[tuple[dict[str, Any], list[int]] | None] = queue.Queue()
        self.session: Session | None = None  # outgoing, handed over at prepare (6.19+)
        self.retrieved: Session | None = None  # the previous kernel's, after the kexec
        self.lost = threading.Event()  # the current connection ended
        self.gone = threading.Event()  # luod is lost for good
        self.closed = False
        self._reconnecting = False  # one reconnect at a time; its failed tries are quiet
        self.sock: socket.socket | None = None
        self.state = ClientState.IDLE
        self._connect()
        threading.Thread(target=self._dispatch, daemon=True).start()
        hello, fds = self._hello()
        self.generation: str = hello["generation"]
        self.restore: bool = hello["restore"]
        # luod preserves and retrieves for us (v3; 6.19+ with quotas) instead of a session
        self.mediated = bool(hello.get("mediated", not self.gen.sessions))
        if self.restore:
            faultpoint.fire(self.path, name, "restore")
        self.tokens: list[int] = hello.get("tokens", [])
        if fds:
            self.retrieved = Session(self.backend, self.gen, fds[0], name)

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise LiveUpdateError(err=e.errno or errno.ECONNREFUSED,
                                  msg=f"luod at {self.path}: {e.strerror}") from e
        self.sock = sock
        self.lost.clear()
        threading.Thread(target=self._read, args=(sock,), daemon=True).start()

    def _hello(self) -> tuple[dict[str, Any], list[int]]:
        hello, fds = self.request("hello", v=endpoints.LUOD_VERSION, name=self.name, role=self.role)
        self.phase: str = hello["phase"]
        return hello, fds

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend()
        return self._backend

    @property
    def gen(self) -> UapiGeneration:
        """The kernel's uAPI generation (from luod's hello, which read it from uname)."""
        return named(self.generation)

    # -- requests -------------------------------------------------------------------------
    def request(self, op: str, fds: tuple[int, ...] = (), **args: Any
                ) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            rid = self._next
            self._next += 1
            slot: tuple[threading.Event, list[Any]] = (threading.Event(), [])
            self._waiting[rid] = slot
            try:
                if self.sock is None:
                    raise OSError(errno.ENOTCONN, "not connected")
                framing.send(self.sock, {"op": op, "id": rid, **args}, fds)
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
        return envelope.check(reply, "luod refused"), got

    def _read(self, sock: socket.socket) -> None:
        try:
            while True:
                got = framing.recv(sock)
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
            self._ended(sock)

    def _ended(self, sock: socket.socket) -> None:
        for slot in list(self._waiting.values()):
            slot[0].set()
        if sock is not self.sock or self._reconnecting:
            return  # a superseded connection, or a failed try of the reconnect below
        self.lost.set()
        if self.closed or self.reconnect <= 0:
            self.gone.set()
            self._events.put(None)
        else:
            self._reconnecting = True
            self._events.put(({"event": "lost"}, []))
            threading.Thread(target=self._reconnect, daemon=True).start()

    def _reconnect(self) -> None:
        """Connect to luod again (init restarts it) and say hello under the same name."""
        deadline = time.monotonic() + self.reconnect
        delay = 0.02
        while not self.closed and time.monotonic() < deadline:
            if self.sock is not None:
                self.sock.close()
            try:
                self._connect()
                hello, fds = self._hello()
            except LiveUpdateError:
                time.sleep(delay)  # luod is (re)starting: back off, bounded by the window
                delay = min(delay * 2, 0.5)
                continue
            for fd in fds:  # a previous kernel's session is not ours to take again here
                os.close(fd)
            self._reconnecting = False
            self._events.put(({"event": "reconnected", "phase": hello["phase"]}, []))
            return
        self._reconnecting = False
        self.gone.set()
        self._events.put(None)

    def _ack(self, event: str, error: str | None = None,
             files: set[str] | None = None) -> None:
        msg: dict[str, Any] = {"op": "ack", "event": event}
        if error is not None:
            msg["error"] = error
        if files is not None:
            msg["files"] = sorted(files)
        try:
            if self.sock is not None:
                framing.send(self.sock, msg)
        except OSError:
            pass  # the reader sees the connection end and reconnects

    def _dispatch(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                # luod gone for good. Before freeze: resume. After: this process still runs
                # when the reconnect window ends, so no reboot took it -- resume too (with no
                # reconnect window, stay paused: the kexec may be under way).
                if self.state is ClientState.PREPARED or (
                        self.state is ClientState.FROZEN and self.reconnect > 0):
                    self._cancelled("luod went away and did not come back")
                return
            msg, fds = item
            event = msg.get("event")
            try:
                if event == "lost":
                    if self.state is ClientState.PREPARED:
                        self._cancelled("luod went away")
                elif event == "reconnected":
                    if self.state is not ClientState.IDLE:
                        self._cancelled(f"luod restarted in this kernel (now "
                                        f"{msg.get('phase')}): the update did not happen")
                elif event == "prepare":
                    faultpoint.fire(self.path, self.name, "prepare")
                    self.state = ClientState.PREPARED
                    self.mediated = bool(msg.get("mediated", self.mediated))
                    if fds:
                        self.session = Session(self.backend, self.gen, fds[0], self.name)
                    self.files = set()
                    if self.on_prepare:
                        self.on_prepare(self)
                    self._ack("prepare", files=self.files)
                elif event == "freeze":
                    faultpoint.fire(self.path, self.name, "freeze")
                    if self.on_freeze:
                        self.on_freeze(self)
                    self.state = ClientState.FROZEN
                    self._ack("freeze")
                elif event == "cancel":
                    self._cancelled(str(msg.get("reason", "")))
                elif event == "phase" and self.on_phase:
                    self.on_phase(msg)
            except Exception as e:  # a failing callback: refuse the event with the reason
                print(f"luod client {self.name}: {event}: {e}", flush=True)
                if event in ("prepare", "freeze"):
                    self._ack(str(event), error=str(e))

    def _cancelled(self, reason: str) -> None:
        self.state = ClientState.IDLE
        if self.session is not None:
            self.session.close()  # the 6.19 abort path: closing the session unpreserves
            self.session = None
        if self.on_cancel:
            self.on_cancel(self, reason)

    # -- the API --------------------------------------------------------------------------
    def preserve(self, fd: int, token: int, component: str = "memfd") -> None:
        """Keep ``fd`` across the coming kexec under ``token`` (this client's namespace);
        ``component``: the LUO file handler's (``abi.generations.FILE_COMPONENTS``: memfd,
        huge-memfd, iommufd, vfio), told to luod with the prepare acknowledgement."""
        if self.mediated:
            self.request("preserve", (fd,), token=token)
            self.files.add(component)
            return
        if self.session is None:
            raise LiveUpdateError(err=errno.EBUSY, msg="no session yet: preserve inside "
                                  "on_prepare, when luod hands one over")
        self.session.preserve_fd(fd, token)
        self.files.add(component)

    def retrieve(self, token: int) -> int:
        """Get back, after the kexec, what this client preserved under ``token``."""
        if self.mediated:
            return self.request("retrieve", token=token)[1][0]
        if self.retrieved is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"{self.name} has nothing from the "
                                  "previous kernel")
        return self.retrieved.retrieve_fd(token)

    def done(self) -> None:
        """Everything is restored: luod may FINISH once every client is done. The handle on
        the previous kernel's session goes too -- nothing more is retrieved from it, and
        Linux releases a session (``luo_session_release``, an implicit FINISH) only when
        its last handle closes, so one kept open would hold it past luod's FINISH."""
        self.request("done")
        if self.retrieved is not None:
            self.retrieved.close()
            self.retrieved = None

    def status(self) -> dict[str, Any]:
        return self.request("status")[0]

    def close(self) -> None:
        self.closed = True
        if self.sock is None:
            return
        with contextlib.suppress(OSError):  # already gone
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def connect(name: str, timeout: float = 60.0, **kw: Any) -> LuodClient:
    """A client that waits for luod to listen (services start beside it after a kexec) and,
    for a long-running workload, reconnects when luod restarts (30 s window by default)."""
    kw.setdefault("reconnect", 30.0)
    if kw.get("backend") is None:
        kw["backend"] = open_backend()
    path = kw.get("path") or endpoints.socket_path(kw["backend"].cmdline())
    deadline = time.monotonic() + timeout
    with appear.Watch(path) as watch:  # before the first try: no appearance is missed
        while True:
            try:
                return LuodClient(name, **kw)
            except LiveUpdateError as e:
                if time.monotonic() > deadline or \
                        e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise
            # luod is starting: its socket appears when it answers (a stale one is
            # replaced); tried again at least every half second all the same
            watch.wait(min(0.5, max(0.0, deadline - time.monotonic())))
