"""A migration slot: a VMM started empty, waiting for a VM to arrive (QEMU's ``-incoming``,
KubeVirt's target pod created before the migration starts).

    python -m liveupdate.vmm SLOT --incoming [--accel tcg] [--duty F]

It is a luod client from the start, under its own name, so it takes part in every live
update of its host: empty, it preserves nothing; holding a VM, it is a VMM like any other
(freeze saves the state, the next kernel's slot -- init restarts it with the same line --
retrieves and resumes it). A slot that holds nothing answers ``status`` and ``incoming``:
``incoming`` makes a memfd of the announced size **of its own kernel** (the destination's
memory is the destination kernel's), maps it (zero copy, as every VMM) and listens on a
Unix socket beside its control socket; :func:`receive` takes the pages straight into the
mapping, then the VM state, and resumes the VM through :class:`liveupdate.vmm.vmm.Vmm`'s
restore path. The VM's downtime is then measured as a live update's blackout is, and sent
back to the source (:mod:`liveupdate.vmm.migration`).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from liveupdate.client.backends import Backend, open_backend
from liveupdate.client.luod import LuodClient, connect
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints, service
from liveupdate.vmm import migration
from liveupdate.vmm.migration import PAGE
from liveupdate.vmm.vmm import STATE_SIZE, Vmm


class Slot:
    def __init__(self, name: str, accel: str, duty: float,
                 backend: Backend | None = None) -> None:
        self.name, self.accel, self.duty = name, accel, duty
        self.backend = backend or open_backend()
        self.vmm: Vmm | None = None
        self.table: dict[str, service.Handler] = {}  # the VM's requests, once it is here
        self.origin = ""
        self.listening: str | None = None
        self.lock = threading.Lock()
        self.client: LuodClient = connect(name, backend=self.backend,
                                          on_prepare=self._prepare, on_freeze=self._freeze,
                                          on_cancel=self._cancel)
        if self.client.restore:  # it held a VM at the last update: resume it
            try:
                self.hold(Vmm(name, 0, accel, self.backend, duty=duty, client=self.client))
            except LiveUpdateError as e:
                if e.errno != errno.ENOENT:
                    raise
                self.client.done()  # it was empty: nothing to restore, luod may FINISH

    def hold(self, vmm: Vmm) -> None:
        self.table = {**vmm.handlers, **migration_handlers(vmm, self)}
        self.vmm, self.listening = vmm, None

    # luod's events reach the VM once there is one; an empty slot preserves nothing
    def _prepare(self, c: LuodClient) -> None:
        if self.vmm is not None:
            self.vmm._prepare(c)

    def _freeze(self, c: LuodClient) -> None:
        if self.vmm is not None:
            self.vmm._freeze(c)

    def _cancel(self, c: LuodClient, reason: str) -> None:
        if self.vmm is not None:
            self.vmm._cancel(c, reason)

    def status(self) -> dict[str, Any]:
        if self.vmm is not None:
            return {**self.vmm.status(), "slot": True, "origin": self.origin}
        return {"name": self.name, "slot": True, "empty": True,
                "listening": self.listening, "pid": os.getpid()}

    def _incoming(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if self.vmm is not None or self.listening is not None:
                raise LiveUpdateError(err=errno.EBUSY, msg=f"slot {self.name} is taken")
            if self.client.state.value != "idle":
                raise LiveUpdateError(err=errno.EBUSY, msg="a live update is under way")
            path = endpoints.service_socket(self.backend.cmdline(), f"migrate-{self.name}")
            if os.path.exists(path):
                os.unlink(path)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            srv.listen(1)
            self.listening = path
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return {"listening": path}

    def _accept(self, srv: socket.socket) -> None:
        with srv:
            conn, _ = srv.accept()
            os.unlink(srv.getsockname())
        with conn:
            try:
                self.receive(conn)
            except (LiveUpdateError, OSError, ValueError) as e:
                print(f"vmm {self.name}: incoming migration failed: {e}", flush=True)
                self.listening = None

    def receive(self, conn: socket.socket) -> None:
        """Take one VM from ``conn`` (see :mod:`liveupdate.vmm.migration` for the records)."""
        hello = migration.recv_json(conn, b"LUMG")
        size = int(hello["size"])
        fd = self.backend.memfd_create(f"vm-{self.name}")
        self.backend.ftruncate(fd, size)
        mapping = self.backend.map(fd, size)
        try:
            while True:
                tag, n = migration.recv_head(conn)
                if tag == b"STAT":
                    break
                if tag != b"PAGE" or n > size // PAGE:
                    raise LiveUpdateError(err=errno.EPROTO, msg=f"migration: record {tag!r}")
                idx = bytearray(4 * n)
                migration.recv_exact(conn, memoryview(idx))
                for page in memoryview(idx).cast("I"):
                    if page >= size // PAGE:
                        raise LiveUpdateError(err=errno.EPROTO, msg=f"page {page} outside")
                    migration.recv_exact(conn, mapping.view[page * PAGE : (page + 1) * PAGE])
        finally:
            mapping.close()
        if n > STATE_SIZE:
            raise LiveUpdateError(err=errno.EPROTO, msg="migration: VM state too large")
        # into a state memfd of this kernel, as freeze writes it: the VM then resumes (and
        # is judged) as after a kexec, and the next live update preserves that memfd
        state_fd = self.backend.memfd_create(f"vm-{self.name}-state")
        self.backend.ftruncate(state_fd, STATE_SIZE)
        state = self.backend.map(state_fd, STATE_SIZE)
        try:
            migration.recv_exact(conn, state.view[:n])
        finally:
            state.close()
        self.origin = str(hello.get("origin", ""))
        vmm = Vmm(self.name, size, self.accel, self.backend, duty=self.duty,
                  client=self.client, incoming=(fd, state_fd))
        self.hold(vmm)
        print(f"vmm {self.name}: {vmm.vm.accel.name}, {size >> 20} MiB, migrated in from "
              f"{self.origin}, resumed at step {vmm.status()['steps']}", flush=True)
        migration.send_record(conn, b"DONE", json.dumps(
            {"downtime": vmm.vm.timing.blackout, "slot": self.name}).encode())

    @property
    def handlers(self) -> service.Handlers:
        return SlotHandlers(self)


class SlotHandlers(Mapping[str, service.Handler]):
    """The slot's requests while empty, its VM's (:attr:`Vmm.handlers`) once it holds one."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.own: dict[str, service.Handler] = {
            "status": lambda msg: slot.status(), "incoming": slot._incoming}

    def _table(self) -> Mapping[str, service.Handler]:
        return self.slot.table or self.own

    def __getitem__(self, op: str) -> service.Handler:
        return self._table()[op]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


def migration_handlers(vmm: Vmm, slot: Slot | None = None) -> dict[str, service.Handler]:
    """``migrate`` (to a listening slot's socket) and a ``status`` that says where the VM
    went, beside :attr:`Vmm.handlers`."""
    departed: dict[str, Any] = {}

    def migrate(msg: dict[str, Any]) -> dict[str, Any]:
        if departed:
            raise LiveUpdateError(err=errno.EALREADY, msg=f"migrated to {departed['to']}")
        out = migration.send(vmm, str(msg["to"]), str(msg.get("origin", vmm.name)))
        departed.update(out)
        return out

    def status(msg: dict[str, Any]) -> dict[str, Any]:
        st = {**vmm.status(), "departed": departed or None}
        return {**st, "slot": True, "origin": slot.origin} if slot else st

    return {"migrate": migrate, "status": status}
