"""What luod's clients and administrators may ask (docs/luod-protocol.md): hello, ack,
preserve, retrieve, done, status, sessions, wait -- and the admin's load, update, cancel.
One handler each, in one table (:meth:`Operations.handlers`); what differs between uAPI
generations is asked of the custody, when it runs is the orchestrator's phase guards.

Each client's tokens live in its own namespace: a client asking for a token it did not
preserve gets ENOENT, never another client's file. Admin requests (load, update, cancel)
need uid 0; which uids may be clients at all is the ``allow_uids`` policy.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints
from liveupdate.ipc.framing import field
from liveupdate.luod.custody import Key
from liveupdate.luod.orchestrator import Orchestrator
from liveupdate.luod.server import Conn, Handler, Reply
from liveupdate.luod.state import Phase

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
ADMIN_ONLY = frozenset({"load", "update", "cancel"})


class Operations:
    def __init__(self, o: Orchestrator, allow_uids: frozenset[int]) -> None:
        self.o = o
        self.allow = allow_uids | {0}

    @property
    def handlers(self) -> dict[str, Handler]:
        return {"ack": self.ack, "preserve": self.preserve, "retrieve": self.retrieve,
                "done": self.done, "status": self.status, "sessions": self.sessions,
                "load": self.load, "update": self.update, "cancel": self.cancel,
                "wait": self.wait}

    def gone(self, c: Conn) -> None:
        """A connection ended: the client is no longer connected."""
        with self.o.cond:
            if self.o.conns.get(c.key) is c:
                del self.o.conns[c.key]
            if c in self.o.admins:
                self.o.admins.remove(c)
            self.o.cond.notify_all()

    def hello(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        o = self.o
        if field(msg, "v", int) != endpoints.LUOD_VERSION:
            raise LiveUpdateError(err=errno.EPROTO, msg=f"luod speaks protocol "
                                  f"{endpoints.LUOD_VERSION}")
        name = field(msg, "name", str)
        if not 0 < len(name) <= 40 or not set(name) <= NAME_CHARS:
            raise LiveUpdateError(err=errno.EINVAL, msg="client names are 1-40 characters "
                                  "of letters, digits, '.', '_', '-'")
        if c.uid not in self.allow:
            raise LiveUpdateError(err=errno.EPERM, msg=f"uid {c.uid} is not allowed by "
                                  "luod's policy")
        if msg.get("role", "client") == "admin":
            c.name, c.admin = name, True
            with o.cond:
                o.admins.append(c)
            return {"v": endpoints.LUOD_VERSION, "generation": str(o.gen),
                    "phase": o.phase.value, "restore": False}, []
        with o.cond:
            if (c.uid, name) in o.conns:
                raise LiveUpdateError(err=errno.EBUSY, msg=f"client {name!r} of uid {c.uid} "
                                      "is already connected")
            c.name = name
            o.conns[c.key] = c
            rec = o.records.get(c.key)
            reply: dict[str, Any] = {"v": endpoints.LUOD_VERSION, "generation": str(o.gen),
                                     "phase": o.phase.value, "restore": False}
            out: list[int] = []
            if o.phase is Phase.UPDATED and rec is not None:
                reply["restore"] = True
                extra, out = o.custody.restore_hello(c.key, rec)
                reply.update(extra)
            reply["mediated"] = o.mediated
            return reply, out

    def ack(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        """An acknowledgement -- or, with ``error``, the client's refusal of the event (its
        callback failed): the barrier fails at once with the client's reason. prepare's
        names the components of the files the client preserved (``files``)."""
        event = field(msg, "event", str)
        error = msg.get("error")
        with self.o.cond:
            if error is not None:
                c.refused[event] = str(error)[:200].replace("\n", " ")
            else:
                if event == "prepare":
                    files = msg.get("files", [])
                    c.files = {str(f)[:40] for f in files} if isinstance(files, list) \
                        else set()
                c.acks.add(event)
            self.o.cond.notify_all()
        return {}, []

    def _charge(self, c: Conn, size: int) -> tuple[int, int]:
        """The client's usage with one more file of ``size`` bytes; EDQUOT past its quota."""
        quota = self.o.quota
        files, nbytes = self.o.usage.get(c.key, (0, 0))
        files, nbytes = files + 1, nbytes + size
        if quota.files and files > quota.files:
            raise LiveUpdateError(err=errno.EDQUOT, msg=f"{c.name}: quota of "
                                  f"{quota.files} preserved files reached")
        if quota.bytes and nbytes > quota.bytes:
            raise LiveUpdateError(err=errno.EDQUOT, msg=f"{c.name}: {nbytes} bytes would pass "
                                  f"the quota of {quota.bytes}")
        return files, nbytes

    def preserve(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        o = self.o
        if not o.mediated:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="on 6.19+ clients preserve into "
                                  "their own session")
        token = field(msg, "token", int)
        if len(fds) != 1:
            raise LiveUpdateError(err=errno.EBADF, msg="preserve takes exactly one fd")
        size = o.backend.size(fds[0])
        with o.cond:
            o.custody.admit_preserve(c.key, o.phase, o.busy)
            rec = o.record(c.key)
            if token in rec.tokens:
                raise LiveUpdateError(err=errno.EEXIST, msg=f"token {token:#x} is yours "
                                      "already")
            usage = self._charge(c, size)
            rec.tokens[token] = o.custody.preserve(c.key, fds[0], token, o.records)
            o.usage[c.key] = usage
        return {"token": token}, []

    def retrieve(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        o = self.o
        if not o.mediated:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="on 6.19+ clients retrieve from "
                                  "the session luod handed them")
        token = field(msg, "token", int)
        with o.cond:
            fd = o.custody.retrieve(c.key, o.records.get(c.key), token, c.name, o.phase)
        return {"token": token}, [fd]

    def done(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        self.o.client_done(c.key)
        return {"phase": self.o.phase.value}, []

    # -- status ---------------------------------------------------------------------------
    def status_fields(self) -> dict[str, Any]:
        o = self.o
        with o.cond:
            return {"generation": str(o.gen), "phase": o.phase.value, "pid": os.getpid(),
                    "busy": o.busy or None, "last_error": o.last_error or None,
                    "loaded": o.loaded, "update": o.reg.update,
                    "boot_id": o.store.boot_id,  # the kernel this luod runs on
                    "clients": [{"uid": u, "name": n} for u, n in sorted(o.conns)],
                    "allow_uids": sorted(self.allow),
                    "reports": o.reports[-5:], "listening_ns": o.listening_ns}

    def status(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        return self.status_fields(), []

    def sessions(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        o = self.o
        with o.cond:
            own = c.uid == 0

            def mine(key: Key) -> bool:
                return own or key == c.key

            return {"clients": [
                {"uid": r.uid, "name": r.name, "session": r.session or None,
                 "tokens": {f"{k:#x}": f"{v:#x}" for k, v in r.tokens.items()},
                 "done": (r.uid, r.name) in o.done}
                for r in o.records.values() if mine((r.uid, r.name))]}, []

    def wait(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        """Block until luod is NORMAL and idle (``luoctl update`` after the kexec)."""
        o = self.o
        timeout = msg.get("timeout", 120)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise LiveUpdateError(err=errno.EINVAL, msg="wait: timeout must be seconds")
        with o.cond:
            if not o.cond.wait_for(lambda: o.phase is Phase.NORMAL and not o.busy, timeout):
                raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"luod is still "
                                      f"{o.phase.value} after {timeout}s")
        return self.status_fields(), []

    # -- admin ----------------------------------------------------------------------------
    def load(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        return self.o.load_alone(msg.get("image"), msg.get("cmdline"), msg.get("release")), []

    def update(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        self.o.update(msg.get("image"), msg.get("cmdline"), msg.get("release"))
        return {}, []  # not reached: the update ends in reboot() or raises

    def cancel(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        self.o.cancel()
        return self.status_fields(), []
