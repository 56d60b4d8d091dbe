"""The update itself: load, prepare, freeze, the kexec, cancel and finish, walking every
connected client through one state machine (:mod:`liveupdate.luod.state`).

1. **load** -- decide, before anyone pauses, what the update will do
   (:mod:`~liveupdate.luod.preflight`), then ``kexec_file_load``. With negotiation, the
   image is loaded again after prepare, so the kernel checks what was actually preserved
   while the VMs still run; a device or huge-memfd file the next kernel cannot read
   (the pre-flight's ``lacks``) is refused after prepare too, named by the clients' acks.
2. **prepare** -- every client is told ``prepare`` and must acknowledge in time; the
   custody (:mod:`~liveupdate.luod.custody`) gives each what it preserves into, then
   luod's registry is preserved.
3. **freeze** -- clients pause and acknowledge; luod writes the final registry and calls
   ``reboot(LINUX_REBOOT_CMD_KEXEC)``.
4. **updated** -- the next kernel's luod finds its registry through LUO, hands each
   returning client exactly its own resources, and FINISHes when every client is done, or
   after a timeout, reporting and reclaiming what nobody claimed.

A client that does not acknowledge in time, dies before acknowledging, or a failing load,
prepare or reboot cancels the update: clients are told ``cancel`` (and resume) and the
custody leaves nothing preserved. Every failure is one line in ``status``. Which phase each
operation may run in is declared once (:data:`liveupdate.luod.state.GUARDS`).
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from liveupdate.client.backends import Backend
from liveupdate.client.device import LiveUpdate
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.framing import field
from liveupdate.luod import registry
from liveupdate.luod.custody import Key, custody_for
from liveupdate.luod.persistence import Persistence
from liveupdate.luod.state import Event, Guard, Phase, check, guarded, next_phase

if TYPE_CHECKING:
    from liveupdate.luod.server import Conn


@dataclass(frozen=True)
class Quota:
    """Per client, for one update: preserved files and bytes (0: no limit)."""

    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Timeouts:
    prepare: float = 10.0
    freeze: float = 10.0
    finish: float = 60.0


DEFAULT_TIMEOUTS = Timeouts()
NO_QUOTA = Quota()


class Orchestrator:
    def __init__(self, backend: Backend, path: str, *, timeouts: Timeouts = DEFAULT_TIMEOUTS,
                 quota: Quota = NO_QUOTA) -> None:
        self.backend = backend
        self.timeouts = timeouts
        self.dev = LiveUpdate(backend)  # EBUSY when another luod has the device
        self.gen = self.dev.gen
        self.quota = quota
        self.custody = custody_for(self.dev, bool(quota.files or quota.bytes))
        self.mediated = self.custody.mediated
        self.usage: dict[Key, tuple[int, int]] = {}  # files, bytes this update
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.phase = Phase.NORMAL
        self.listening_ns = 0  # CLOCK_MONOTONIC when its socket was bound (a blackout part)
        self.busy = ""  # the running operation (load, update, prepare)
        self.last_error = ""
        self.loaded: dict[str, Any] | None = None
        self.conns: dict[Key, Conn] = {}  # clients, by (uid, name)
        self.admins: list[Conn] = []
        self.records: dict[Key, registry.ClientRecord] = {}
        self.done: set[Key] = set()
        self.reports: list[dict[str, Any]] = []
        self.store = Persistence(backend, path, backend.boot_id(), str(self.gen))

    @property
    def reg(self) -> registry.Registry:
        return self.store.reg

    # -- the phase guards -----------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, what: str, guard: Guard) -> Iterator[None]:
        """Run ``what`` where its guard allows it: an exclusive one alone (``busy``) and
        without the lock, any other under the lock."""
        with self.cond:
            check(guard, self.phase, self.busy)
            if not guard.exclusive:
                yield
                return
            self.busy = what
        try:
            yield
        finally:
            with self.cond:
                self.busy = ""
                self.cond.notify_all()

    # -- start ----------------------------------------------------------------------------
    def recover(self) -> None:
        """What the kernel says about the last update: a previous luod's registry crossed
        the kexec (UPDATED), or a fresh start (a previous luod that died mid-update left the
        kernel cancelling, and its state file says why)."""
        fd = self.custody.previous_registry()
        if fd is not None:
            self.last_error = self.store.adopt(fd) or self.last_error
            self.records = {(c.uid, c.name): c for c in self.reg.clients}
            self.last_error = self.custody.reclaim(self.records) or self.last_error
        previous = self.store.read_state()
        if fd is not None:
            self.phase = Phase.UPDATED
            self.reg.timeline["updated"] = time.time()
            if not self._finish_now():
                threading.Thread(target=self._finish_after_timeout, daemon=True).start()
        elif previous.get("phase") in ("prepared", "frozen"):
            self.last_error = (f"the previous luod ended while {previous['phase']}; the "
                               "kernel cancelled the update and every client resumed")
        elif previous.get("phase") == "updated":
            self.last_error = ("the previous luod ended before FINISH; closing its sessions "
                               "finished them: what clients had retrieved is theirs, the "
                               "rest was freed")
        self._save_state()

    def _finish_now(self) -> bool:
        """At start, FINISH an update nobody preserved anything in instead of waiting for
        the timeout; a FINISH that fails here is said (``last_error``) and left to the
        timeout, as luod must come up whatever happens."""
        if self.waiting_for():
            return False
        try:
            self.finish("no client preserved anything")
        except (LiveUpdateError, OSError) as e:
            self.last_error = f"FINISH at start failed ({e}); retried at the timeout"
            return False
        return True

    def _save_state(self) -> None:
        self.store.save_state(self.phase.value, self.last_error)

    def _write_registry(self) -> None:
        self.store.write(list(self.records.values()))

    # -- load -----------------------------------------------------------------------------
    def load(self, path: str, cmdline: str | None, release: str | None) -> dict[str, Any]:
        # imported here, not at the top: the image parsers bring numpy (~130 ms), and the
        # luod that starts after a kexec is inside the VMs' blackout
        from liveupdate.luod import preflight

        line = cmdline if cmdline is not None else self.backend.cmdline()
        plan = preflight.plan(path, release, line, self.backend.uname(),
                              self.backend.cmdline())
        self.backend.kexec_file_load(path, line)
        self.loaded = {"image": path, **plan, "cmdline": line,
                       **({"warning": "Linux guarantees no live update across versions"}
                          if release else {})}
        return self.loaded

    @guarded("load")
    def load_alone(self, image: Any, cmdline: str | None, release: str | None
                   ) -> dict[str, Any]:
        """A load request (``image`` as received: checked here, so a bad one is reported as
        the load's error)."""
        try:
            return self.load(field({"image": image}, "image", str), cmdline, release)
        except LiveUpdateError as e:
            self.last_error = f"load: {e.message}"
            raise

    def _recheck(self) -> None:
        """After prepare, with every file preserved: load the image again, so that a kernel
        that negotiates checks what is actually preserved (a sealed memfd for memfd-v1)
        while the VMs still run -- not in reboot(), after they paused."""
        if self.loaded is None or self.loaded["handover"]["mode"] != "negotiated":
            return
        try:
            self.backend.kexec_file_load(self.loaded["image"], self.loaded["cmdline"])
        except LiveUpdateError as e:
            raise LiveUpdateError(err=e.errno, msg=f"the preserved files cannot cross: "
                                  f"{e.message}") from e

    def check_files(self) -> None:
        """After prepare, nothing paused: EINVAL if a client preserved a file of a component
        the next kernel cannot take (the pre-flight's ``lacks``). Our deviation: Linux
        checks nothing; the next kernel's ``luo_file_deserialize`` finds no handler and every
        open of /dev/liveupdate fails with EIO."""
        if self.loaded is None:
            return
        lacks: dict[str, str] = self.loaded.get("lacks", {})
        bad = {c.name: sorted(c.files & lacks.keys()) for c in self.conns.values()}
        bad = {name: comps for name, comps in bad.items() if comps}
        if bad:
            who = "; ".join(f"client {n} preserved {', '.join(comps)} files"
                            for n, comps in sorted(bad.items()))
            what = ", ".join(f"{lacks[c]} ({c})" for c in sorted({c for v in bad.values()
                                                                  for c in v}))
            raise LiveUpdateError(err=errno.EINVAL, msg=(
                f"the next kernel ({self.loaded['image']}, LUO {self.loaded['generation']})"
                f" cannot take this handover: {who}; it cannot read {what} -- Linux would "
                "EIO"))

    # -- the update -----------------------------------------------------------------------
    def _set_phase(self, event: Event) -> None:
        self.phase = next_phase(self.phase, event)
        now = time.time()
        self.reg.timeline[self.phase.value] = now
        self._save_state()  # before anyone hears of it: a luod killed now is explained
        print(f"luod: {event.value}: {self.phase.value}", flush=True)
        self.cond.notify_all()
        for a in list(self.admins):  # progress for luoctl
            a.send({"event": "phase", "phase": self.phase.value, "time": now,
                    "start": self.reg.timeline.get("start", now)})

    def _barrier(self, event: str, timeout: float) -> None:
        """Every connected client acknowledges ``event`` within ``timeout``; a client that
        dies (EPIPE) or stays silent (ETIMEDOUT) fails it, named."""
        deadline = time.monotonic() + timeout
        for c in list(self.conns.values()):
            def answered(c: Conn = c) -> bool:
                return event in c.acks or event in c.refused or not c.alive

            if not self.cond.wait_for(answered, max(0.0, deadline - time.monotonic())):
                raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"client {c.name} did not "
                                      f"acknowledge {event} in {timeout}s")
            if event in c.refused:
                raise LiveUpdateError(err=errno.ECANCELED, msg=f"client {c.name} failed "
                                      f"{event}: {c.refused.pop(event)}")
            if event not in c.acks:
                raise LiveUpdateError(err=errno.EPIPE, msg=f"client {c.name} went away "
                                      f"during {event}")

    @guarded("update")
    def update(self, image: Any, cmdline: str | None, release: str | None) -> None:
        """The whole update; on success the process ends in ``reboot()``."""
        try:
            started = time.time()
            if image is not None:
                self.load(field({"image": image}, "image", str), cmdline, release)
            if self.loaded is None:
                raise LiveUpdateError(err=errno.EINVAL, msg="no next kernel loaded")
            with self.cond:
                self.last_error = ""
                self.reg.timeline = {"start": started}
                self._prepare()
                self.check_files()
                self._recheck()
                self._freeze()
                self.reg.update += 1
                self.reg.timeline["reboot"] = time.time()
                self._write_registry()
                self.cond.notify_all()
            self.backend.reboot_kexec()  # on success this process ends here
            raise LiveUpdateError(err=errno.EIO, msg="reboot(KEXEC) returned")
        except (LiveUpdateError, OSError) as e:  # OSError: the host's (EMFILE, ENOSPC...)
            err = e if isinstance(e, LiveUpdateError) else LiveUpdateError.from_os(e)
            with self.cond:
                self._cancel_update(err.message)
            if err is e:
                raise
            raise err from e

    def holds(self, rec: registry.ClientRecord) -> bool:
        return bool(rec.tokens or rec.session)

    def record(self, key: Key) -> registry.ClientRecord:
        return self.records.setdefault(key, registry.ClientRecord(*key))

    def _prepare(self) -> None:
        # a client that left holding nothing is forgotten: the next kernel must not wait
        self.records = {k: r for k, r in self.records.items()
                        if k in self.conns or self.holds(r)}
        self._set_phase(Event.PREPARE)
        self.busy = "prepare"
        if self.custody.fresh_each_update:
            self.usage = {}
        for c in list(self.conns.values()):
            c.acks.clear()
            c.files.clear()
            out = self.custody.open_for(c.key, self.record(c.key))
            c.send({"event": "prepare", "mediated": self.mediated}, out)
        self._barrier("prepare", self.timeouts.prepare)
        self._write_registry()
        self.custody.preserve_registry(self.store.fd)
        self.busy = "update"

    def _freeze(self) -> None:
        self._set_phase(Event.FREEZE)
        for c in list(self.conns.values()):
            c.send({"event": "freeze"})
        self._barrier("freeze", self.timeouts.freeze)

    def _cancel_update(self, reason: str) -> None:
        """Back to NORMAL with every client resumed and nothing left preserved."""
        self.last_error = reason
        self.usage = {}
        for c in list(self.conns.values()):
            c.send({"event": "cancel", "reason": reason})
        self.custody.cancel(self.records)
        if self.phase in (Phase.PREPARED, Phase.FROZEN):
            self._set_phase(Event.CANCEL)
        self._save_state()

    @guarded("cancel")
    def cancel(self) -> None:
        """An administrator's CANCEL, from Prepared or Frozen."""
        self._cancel_update("cancelled by an administrator")

    # -- after the kexec ------------------------------------------------------------------
    def waiting_for(self) -> set[Key]:
        """The clients the previous kernel's luod preserved something for."""
        return {k for k, r in self.records.items() if self.holds(r)}

    def client_done(self, key: Key) -> None:
        with self.cond:
            self.done.add(key)
            if self.phase is Phase.UPDATED and self.waiting_for() <= self.done:
                self.finish("every client is done")

    def _finish_after_timeout(self) -> None:
        with self.cond:
            if self.cond.wait_for(lambda: self.phase is not Phase.UPDATED,
                                  self.timeouts.finish):
                return
            missing = sorted(f"{n} (uid {u})" for u, n in self.waiting_for() - self.done)
            self.finish(f"timeout after {self.timeouts.finish}s; unclaimed resources of "
                        f"{', '.join(missing)} reclaimed")

    @guarded("finish")
    def finish(self, why: str) -> None:
        self.usage = {}
        self.custody.finish()
        if self.waiting_for() - self.done:
            self.last_error = f"FINISH: {why}"
        self.reg.timeline["normal"] = time.time()
        self.reports.append({"update": self.reg.update, "timeline": dict(self.reg.timeline),
                             "finish": why})
        self.records = {k: registry.ClientRecord(r.uid, r.name) for k, r in
                        self.records.items() if k in self.conns}
        self.done.clear()
        self._set_phase(Event.FINISH)
