"""luod's socket: accept, one thread per connection reading records
(:mod:`liveupdate.ipc.framing`), dispatch through the operations' handler table, and the one
helper of :mod:`liveupdate.ipc.envelope` turning results and errors into replies.

A connection is a :class:`Conn`: the peer's uid and pid from SO_PEERCRED, then (after
``hello``) its name -- the pair (uid, name) is the client.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import envelope, framing, service

Reply = tuple[dict[str, Any], list[int]]  # the reply's fields, fds sent with it


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    uid: int
    pid: int
    name: str = ""
    acks: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # event -> the client's reason
    files: set[str] = field(default_factory=set)  # components it preserved (prepare's ack)
    alive: bool = True
    admin: bool = False  # luoctl: watches and commands, holds nothing
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple[int, str]:
        return (self.uid, self.name)

    def send(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        with self.send_lock:
            try:
                framing.send(self.sock, msg, fds)
            except OSError:
                self.alive = False


Handler = Callable[[Conn, dict[str, Any], list[int]], Reply]


def listen(path: str, mode: int) -> socket.socket:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # replaces a stale socket of a previous luod (we have the device)
    return service.bound(path, mode, 64)


def serve_forever(server: socket.socket, serve: Callable[[Conn], None]) -> None:
    """Accept connections until the listening socket is gone."""
    starved = False
    while True:
        try:
            sock, _ = server.accept()
            if starved:
                print("luod: accepting connections again", flush=True)
            starved = False
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return  # the listening socket is gone: luod is shutting down
            # out of fds or memory: the connection waits in the backlog; keep serving the
            # connected clients and try again shortly instead of dying (init would restart
            # a luod that forgot its update)
            if not starved:
                print(f"luod: accept: {e.strerror}; retrying", flush=True)
            starved = True
            time.sleep(0.1)
            continue
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, _gid = (int.from_bytes(creds[i : i + 4], "little") for i in (0, 4, 8))
        threading.Thread(target=serve, args=(Conn(sock, uid, pid),), daemon=True).start()


def serve_connection(c: Conn, handlers: Mapping[str, Handler], hello: Handler,
                     admin_only: frozenset[str], gone: Callable[[Conn], None]) -> None:
    """One connection until it ends: ``hello`` first, then ``handlers`` (those in
    ``admin_only`` need uid 0); ``ack`` gets no reply; a refused hello ends it."""

    def handle(msg: dict[str, Any], fds: list[int], out: list[int]) -> dict[str, Any]:
        op = framing.field(msg, "op", str)
        if not c.name:
            if op != "hello":
                raise LiveUpdateError(err=errno.EPROTO, msg="say hello first")
            handler = hello
        else:
            handler = service.lookup(handlers, msg, "luod: ")
            if op in admin_only and c.uid != 0:
                raise LiveUpdateError(err=errno.EPERM, msg=f"{op} needs uid 0")
        fields, got = handler(c, msg, fds)
        out.extend(got)
        return fields

    try:
        while True:
            try:
                received = framing.recv(c.sock)
            except LiveUpdateError as e:
                c.send(envelope.failure(e))  # a malformed record has no id to repeat
                continue
            except OSError:
                received = None
            if received is None:
                return
            msg, fds = received
            out: list[int] = []
            try:
                reply = envelope.run(msg.get("id"), functools.partial(handle, msg, fds, out))
            finally:
                for fd in fds:
                    os.close(fd)
            if msg.get("op") != "ack":
                c.send(reply, tuple(out))
            for fd in out:
                os.close(fd)
            if not c.name and not reply["ok"]:
                return  # a refused hello ends the connection
    finally:
        c.alive = False
        c.sock.close()
        gone(c)
