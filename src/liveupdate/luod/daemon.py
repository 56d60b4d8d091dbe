"""The live update daemon, assembled from its rooms.

luod is the only opener of /dev/liveupdate. Clients (VMMs, caches) connect to its socket, say
who they are (uid from SO_PEERCRED, plus a name: the pair is the client, unique, and keeps
its identity across the kexec) and hand over what must survive. The rooms:

* :mod:`~liveupdate.luod.server` -- the socket: accept, framing, dispatch;
* :mod:`~liveupdate.luod.operations` -- what clients and admins may ask, one handler table;
* :mod:`~liveupdate.luod.orchestrator` -- the update (barrier, prepare, freeze, cancel,
  finish), its phase guards declared once in :mod:`~liveupdate.luod.state`;
* :mod:`~liveupdate.luod.preflight` -- what an update will do, before anyone pauses;
* :mod:`~liveupdate.luod.custody` -- who holds the files, one object per kind of uAPI;
* :mod:`~liveupdate.luod.persistence` -- the registry memfd and the state file.

luod imports nothing from the emulated kernel: it runs unchanged on a real one.
"""

from __future__ import annotations

import socket
import time

from liveupdate.client.backends import Backend
from liveupdate.luod import server
from liveupdate.luod.operations import ADMIN_ONLY, Operations
from liveupdate.luod.orchestrator import DEFAULT_TIMEOUTS, NO_QUOTA, Orchestrator, Quota, Timeouts
from liveupdate.luod.server import Conn


class Luod(Orchestrator):
    """The orchestrator with its socket and operations."""

    def __init__(self, backend: Backend, path: str, *, allow_uids: frozenset[int],
                 timeouts: Timeouts = DEFAULT_TIMEOUTS, mode: int = 0o600,
                 quota: Quota = NO_QUOTA) -> None:
        super().__init__(backend, path, timeouts=timeouts, quota=quota)
        self.path = path
        self.mode = mode
        self.ops = Operations(self, allow_uids)
        self.server: socket.socket | None = None

    def listen(self) -> socket.socket:
        self.server = server.listen(self.path, self.mode)
        self.listening_ns = time.monotonic_ns()
        return self.server

    def serve_forever(self) -> None:
        assert self.server is not None
        server.serve_forever(self.server, self.serve)

    def serve(self, c: Conn) -> None:
        """One connection, through the operations' table."""
        server.serve_connection(c, self.ops.handlers, self.ops.hello, ADMIN_ONLY,
                                self.ops.gone)
