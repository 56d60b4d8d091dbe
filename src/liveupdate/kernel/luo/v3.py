"""LUO of the seed generation ("v3", spec/luo.md 1.1, 1.2, 1.4, 1.5): one global state machine
and ``/dev/liveupdate`` with fds preserved by global token. A thin front end over the shared
file lifecycle (:mod:`liveupdate.kernel.luo.files`) and subsystems.

States and events are ``enum liveupdate_state``/``liveupdate_event``; every transition is
declared once in :data:`TRANSITIONS`. The happy path::

    NORMAL --SET_EVENT(PREPARE)--> PREPARED --reboot(KEXEC)--> FROZEN --jump-->
    (next kernel) UPDATED --SET_EVENT(FINISH)--> NORMAL

PREPARE prepares every registered file (the heavy work, v3's timing) and every subsystem, in
registration order, writes the files FDT and the ``LUO`` FDT and adds the ``LUO`` subtree to
the live KHO tree; any failure rolls back what was done and leaves NORMAL with that errno.
CANCEL (from PREPARED or FROZEN) undoes it all and removes the subtree. ``reboot(KEXEC)`` in
PREPARED freezes first (the first step of ``kernel/reboot.py``); a failed freeze cancels
everything and ``reboot()`` fails with its errno; outside PREPARED the kexec carries no LUO
data. The next kernel finds the subtree: UPDATED; an incompatible LUO or files FDT, or a file
handler it does not have, is ``luo_restore_fail()`` -- a panic with the reason. FINISH ends
every file never restored (its memory is freed) and returns to NORMAL.

The uAPI: a single opener (a second ``open`` is EBUSY); ``GET_STATE``; ``SET_EVENT`` with
PREPARE, FINISH, CANCEL (FREEZE or an unknown event: EINVAL -- freeze comes only from
``reboot()``); ``FD_PRESERVE`` and ``FD_UNPRESERVE`` only in NORMAL or UPDATED (else EBUSY),
``FD_RESTORE`` only in UPDATED (EBUSY), a duplicate token EEXIST, an unknown token ENOENT, a
second restore EINVAL, an fd that is not a file of this kernel EBADF, no handler ENOENT --
checked in that order: state, fd, handler, token. v3's ``luo_ioctl_fd_preserve`` returned 0
even when preserving failed (``if (!ret) return ret;`` then a 0); that bug is not copied:
errors reach userspace. ``GET_FD_STATE``/``SET_FD_EVENT`` follow the v3 patch "luo_files:
luo_ioctl: Add ioctls for per-file state management": the state of one file by token
(``incoming`` picks the set), and PREPARE/FREEZE/CANCEL/FINISH of one file; FINISH of a file
needs UPDATED (EBUSY); an unknown event is EINVAL.

Release of ``/dev/liveupdate`` (the last handle closed, or its holder died): v3 unregisters
every file and leaves the global state alone. Deliberately beyond v3, a release in PREPARED
also cancels, back to NORMAL, so nothing stays pinned when the orchestrator dies. During the
reboot (FROZEN) a release changes nothing: frozen means frozen.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from liveupdate.abi import generations, luo_v3, uapi
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.uapi import Event, State, Target
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.kho.incoming import restore_free
from liveupdate.kernel.luo.files import FileSet, IncomingSet, InFile
from liveupdate.kernel.luo.handler import FileHandler
from liveupdate.kernel.luo.subsystems import FILES_SUBSYSTEM, Subsystems

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.NORMAL, Event.PREPARE): State.PREPARED,
    (State.PREPARED, Event.FREEZE): State.FROZEN,
    (State.PREPARED, Event.CANCEL): State.NORMAL,
    (State.FROZEN, Event.CANCEL): State.NORMAL,
    (State.UPDATED, Event.FINISH): State.NORMAL,
}
MUTABLE = (State.NORMAL, State.UPDATED)
Resolve = Callable[[int], File]
Reply = tuple[dict[str, Any], list[File]]


class DeviceOps:
    """``/dev/liveupdate`` as a kind of file."""

    name = "liveupdate"

    def __init__(self, luo: LuoV3) -> None:
        self.luo = luo

    def release(self, f: File) -> None:
        self.luo.release()

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Callable[[int], File]) -> tuple[bytes, list[File]]:
        return self.luo.ioctl(cmd, arg, fds, resolve)


class LuoV3:
    def __init__(self, k: Kernel, gen: generations.LuoGeneration,
                 handlers: list[FileHandler], reads: dict[str, tuple[str, ...]]) -> None:
        self.k = k
        self.row = gen
        self.gen = uapi.Gen(gen.uapi)
        self.state = State.NORMAL
        self.handlers = handlers
        self.files = FileSet(lambda: self.handlers)
        self.incoming = IncomingSet()
        self.subsystems = Subsystems(lambda: self.state in MUTABLE,
                                     lambda: self.state is State.UPDATED)
        self.device = DeviceOps(self)
        self.device_open = False
        self.luo_fdt = 0  # the outgoing LUO FDT page, while PREPARED or FROZEN
        self.files_fdt = (0, 0)  # (phys, size) of the outgoing files FDT
        self.incoming_meta: list[int] = []  # the previous kernel's FDT pages, freed at FINISH

    def _event(self, event: Event) -> State:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"LUO: {event.name} is not valid in "
                                  f"state {self.state.name}")
        return nxt

    @property
    def settled(self) -> bool:
        """Nothing of a previous kernel's live update is left to restore or FINISH."""
        return self.state is not State.UPDATED

    def _set(self, state: State) -> None:
        self.k.printk(f"luo: Switched from [{self.state.name.lower()}] to "
                      f"[{state.name.lower()}] state")
        self.state = state

    # -- boot -----------------------------------------------------------------------------
    def boot(self) -> None:
        """``luo_early_startup``: find the previous kernel's LUO subtree, or start NORMAL."""
        kin = self.k.kho_in
        if kin is None:
            return
        try:
            phys = kin.retrieve_subtree(luo_v3.LUO_KHO_ENTRY_NAME)
        except LiveUpdateError:
            return  # no LUO data: a kexec outside PREPARED, or a cold boot
        try:
            luo = luo_v3.decode_luo_fdt(self.k.mem.read_fdt(phys, "LUO FDT"))
            entries: list[luo_v3.FileEntry] = []
            if luo.files_fdt:
                entries = luo_v3.decode_files_fdt(self.k.mem.read_fdt(luo.files_fdt,
                                                                      "files FDT"))
        except AbiError as e:
            self.k.panic(f"LUO: cannot restore the previous kernel's state: {e.message}")
        by_compat = {h.compatible: h for h in self.handlers}
        for entry in entries:
            handler = by_compat.get(entry.compatible)
            if handler is None:
                self.k.panic(f"LUO: no handler for file {entry.token:#x} "
                             f"({entry.compatible!r})")
            self.incoming.files[entry.token] = InFile(entry.token, entry.compatible,
                                                      entry.data, handler)
        self.subsystems.incoming = {n: d for n, d in luo.subsystems.items()
                                    if n != FILES_SUBSYSTEM}
        self.incoming_meta = [phys] + ([luo.files_fdt] if luo.files_fdt else [])
        self.state = State.UPDATED
        self.k.printk(f"luo: restored {len(entries)} files and "
                      f"{len(self.subsystems.incoming)} subsystems: state updated")

    # -- the global events ----------------------------------------------------------------
    def prepare(self) -> None:
        nxt = self._event(Event.PREPARE)
        self.files.prepare_all()
        try:
            self.subsystems.prepare_all()
        except LiveUpdateError:
            self.files.cancel_all()
            raise
        try:
            self._publish()
        except (LiveUpdateError, AbiError) as e:
            self.subsystems.cancel_all()
            self.files.cancel_all()
            raise LiveUpdateError(err=e.errno, msg=f"LUO: prepare: {e.message}") from e
        self._set(nxt)

    def freeze(self, formats: dict[str, str]) -> None:
        """``liveupdate_reboot``: the reboot path's first step (the v3 family stands alone:
        its formats are always its own)."""
        if self.state is not State.PREPARED:
            return  # the kexec carries no LUO data
        nxt = self._event(Event.FREEZE)
        try:
            self.files.freeze_all(formats)
            self.subsystems.freeze_all()
            self._publish()
        except (LiveUpdateError, AbiError) as e:
            self.k.printk(f"luo: freeze failed ({e.message}); cancelling")
            self.cancel()
            raise LiveUpdateError(err=e.errno, msg=f"LUO: freeze: {e.message}") from e
        self._set(nxt)

    def cancel(self) -> None:
        nxt = self._event(Event.CANCEL)
        self.files.cancel_all()
        self.subsystems.cancel_all()
        self._withdraw()
        self._set(nxt)

    def finish(self) -> None:
        nxt = self._event(Event.FINISH)
        self.incoming.finish_all()
        self.subsystems.finish_all()
        for phys in self.incoming_meta:  # the previous kernel's LUO and files FDTs
            restore_free(self.k.kho_in, phys)
        self.incoming_meta = []
        self._set(nxt)
        self.k.say_settled()

    # -- the LUO subtree ------------------------------------------------------------------
    def _publish(self) -> None:
        """Write (or rewrite) the files FDT and the LUO FDT; add the subtree once."""
        kout = self.k.require_kho()
        live = [e for e in self.files if e.state in (State.PREPARED, State.FROZEN)]
        blob = luo_v3.encode_files_fdt([luo_v3.FileEntry(e.token, e.handler.compatible,
                                                         e.data) for e in live])
        size = luo_v3.files_fdt_alloc_size(len(live))
        if self.files_fdt[1] != size:
            if self.files_fdt[0]:
                kout.unpreserve_free(*self.files_fdt)
            self.files_fdt = (kout.alloc_preserve(size), size)
        self.k.zero(self.files_fdt[0], size)
        self.k.write(self.files_fdt[0], blob)
        subs = [*self.subsystems.data.items(), (FILES_SUBSYSTEM, self.files_fdt[0])]
        luo_blob = luo_v3.encode_luo_fdt(subs)
        if not self.luo_fdt:
            self.luo_fdt = kout.alloc_preserve(PAGE_SIZE)
            self.k.write(self.luo_fdt, luo_blob)
            kout.add_subtree(luo_v3.LUO_KHO_ENTRY_NAME, self.luo_fdt)
        else:
            self.k.write(self.luo_fdt, luo_blob)

    def _withdraw(self) -> None:
        kout = self.k.require_kho()
        if self.luo_fdt:
            kout.remove_subtree(self.luo_fdt)
            kout.unpreserve_free(self.luo_fdt, PAGE_SIZE)
            self.luo_fdt = 0
        if self.files_fdt[0]:
            kout.unpreserve_free(*self.files_fdt)
            self.files_fdt = (0, 0)

    # -- /dev/liveupdate ------------------------------------------------------------------
    def open(self) -> File:
        if self.device_open:
            raise LiveUpdateError(err=errno.EBUSY, msg="/dev/liveupdate is already open")
        self.device_open = True
        return File(self.device)

    def release(self) -> None:
        self.device_open = False
        if self.state is State.FROZEN:
            return  # the reboot is under way: frozen means frozen
        if self.state is State.PREPARED:
            self.k.printk("luo: /dev/liveupdate released in prepared state: cancelling")
            self.cancel()
        self.files.clear()

    def ioctl(self, cmd: int, arg: bytes, fds: list[int],
              resolve: Resolve) -> tuple[bytes, list[File]]:
        """One ioctl on /dev/liveupdate: the dispatcher's checks (:func:`uapi.lookup`),
        then the command from :data:`IOCTLS`. Returns the bytes copied back and the files to
        install."""
        try:
            entry, a = uapi.lookup(self.gen, Target.DEVICE, cmd, arg)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=e.message) from e
        out, new = IOCTLS[entry.name](self, a, fds, resolve)
        reply = entry.pack(**{**a, **out, "size": a["size"]})
        return reply[: min(a["size"], entry.size)], new

    def _ioc_get_state(self, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Reply:
        return {"state": int(self.state)}, []

    def _ioc_set_event(self, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Reply:
        self._set_event(a["event"])
        return {}, []

    def _ioc_preserve(self, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Reply:
        self._mutable("FD_PRESERVE")
        if not fds:
            raise LiveUpdateError(err=errno.EBADF, msg="FD_PRESERVE: bad fd")
        self.files.add(a["token"], resolve(fds[0]))
        return {}, []

    def _ioc_unpreserve(self, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Reply:
        self._mutable("FD_UNPRESERVE")
        self.files.remove(a["token"])
        return {}, []

    def _ioc_restore(self, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Reply:
        return {}, [self._restore(a["token"])]

    def _ioc_get_fd_state(self, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Reply:
        if a["incoming"]:
            self.incoming.get(a["token"])  # ENOENT when unknown
            return {"state": int(State.UPDATED)}, []
        return {"state": int(self.files.get(a["token"]).state)}, []

    def _ioc_set_fd_event(self, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Reply:
        self._set_fd_event(a["event"], a["token"])
        return {}, []

    def _mutable(self, what: str) -> None:
        if self.state not in MUTABLE:
            raise LiveUpdateError(err=errno.EBUSY, msg=f"{what}: LUO is "
                                  f"{self.state.name.lower()}, not normal or updated")

    def _set_event(self, event: int) -> None:
        actions = {Event.PREPARE: self.prepare, Event.FINISH: self.finish,
                   Event.CANCEL: self.cancel}
        ev = _event_of(event)
        action = actions.get(ev) if ev is not None else None
        if action is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"SET_EVENT: event {event} is not "
                                  "PREPARE, FINISH or CANCEL")
        action()

    def _restore(self, token: int) -> File:
        self.k.fault_point("luo_retrieve")
        if self.state is not State.UPDATED:
            raise LiveUpdateError(err=errno.EBUSY, msg="FD_RESTORE: LUO is not updated")
        entry = self.incoming.get(token)
        if entry.file is not None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"FD_RESTORE: token {token:#x} was "
                                  "already restored")
        return self.incoming.retrieve(entry)

    def _set_fd_event(self, event: int, token: int) -> None:
        if event == Event.FINISH:
            if self.state is not State.UPDATED:
                raise LiveUpdateError(err=errno.EBUSY, msg="SET_FD_EVENT(FINISH): LUO is not "
                                      "updated")
            self.incoming.finish_one(self.incoming.get(token))
            return
        per_file = {Event.PREPARE: self.files.prepare_one, Event.FREEZE: self.files.freeze_one,
                    Event.CANCEL: self.files.cancel_one}
        ev = _event_of(event)
        action = per_file.get(ev) if ev is not None else None
        if action is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"SET_FD_EVENT: bad event {event}")
        action(self.files.get(token))

    def enabled_message(self) -> str:
        return f"luo: LUO v3 enabled, state {self.state.name.lower()}"

    def outgoing_files(self) -> list[tuple[str, File, str]]:
        """Every outgoing file, how an error names it and its handler's component."""
        return [(f"token {e.token:#x}", e.file, e.handler.component) for e in self.files]

    def check_limits(self, luo_format: str, what: str) -> None:
        """The files FDT grows with its files: no array limits."""

    # -- reports --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "generation": str(self.gen), "state": self.state.name.lower(),
            "device_open": self.device_open,
            "files": [{"token": f"{e.token:#x}", "compatible": e.handler.compatible,
                       "state": e.state.name.lower(), "data": f"{e.data:#x}"}
                      for e in self.files],
            "incoming": [{"token": f"{e.token:#x}", "compatible": e.compatible,
                          "data": f"{e.data:#x}", "restored": e.file is not None}
                         for e in self.incoming.files.values()],
            "subsystems": [{"name": s.name, "data": self.subsystems.data.get(s.name)}
                           for s in self.subsystems.registered],
            "subtree": f"{self.luo_fdt:#x}" if self.luo_fdt else None,
        }


def _event_of(value: int) -> Event | None:
    try:
        return Event(value)
    except ValueError:
        return None


IOCTLS: dict[str, Callable[[LuoV3, dict[str, Any], list[int], Resolve], Reply]] = {
    "GET_STATE": LuoV3._ioc_get_state,
    "SET_EVENT": LuoV3._ioc_set_event,
    "FD_PRESERVE": LuoV3._ioc_preserve,
    "FD_UNPRESERVE": LuoV3._ioc_unpreserve,
    "FD_RESTORE": LuoV3._ioc_restore,
    "GET_FD_STATE": LuoV3._ioc_get_fd_state,
    "SET_FD_EVENT": LuoV3._ioc_set_fd_event,
}
