"""LUO subsystems, the v2/v3 kernel API for state that is not a file (spec/luo.md 1.4).

A subsystem registers ``prepare``/``freeze``/``cancel``/``finish`` callbacks and carries one
u64 of data across the kexec, written as a property of the ``subsystems`` node of the LUO FDT.
Rules, as v3's ``luo_subsystems.c``: register and unregister only in NORMAL or UPDATED (else
EBUSY); the same name twice is EEXIST; unregistering an unknown one ENOENT;
``liveupdate_get_subsystem_data`` is ENOENT unless UPDATED and the previous kernel wrote it.
Prepare and freeze run in registration order; the first failure cancels those already done
and returns its errno.

The subsystem API does not exist on 6.19+ images: FLB replaced it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Protocol

from liveupdate.errors import LiveUpdateError

FILES_SUBSYSTEM = "file-descriptors"  # file preservation is itself a subsystem in v3


class Subsystem(Protocol):
    name: str

    def prepare(self) -> int: ...
    def freeze(self, data: int) -> int: ...
    def cancel(self, data: int) -> None: ...
    def finish(self, data: int) -> None: ...


class Subsystems:
    def __init__(self, mutable: Callable[[], bool], updated: Callable[[], bool]) -> None:
        self._mutable = mutable  # NORMAL or UPDATED
        self._updated = updated
        self.registered: list[Subsystem] = []
        self.data: dict[str, int] = {}  # outgoing, after prepare
        self.incoming: dict[str, int] = {}

    def register(self, sub: Subsystem) -> None:
        if not self._mutable():
            raise LiveUpdateError(err=errno.EBUSY, msg="subsystems change only in NORMAL or "
                                  "UPDATED")
        if sub.name == FILES_SUBSYSTEM or any(s is sub or s.name == sub.name
                                              for s in self.registered):
            raise LiveUpdateError(err=errno.EEXIST, msg=f"subsystem {sub.name} exists")
        self.registered.append(sub)

    def unregister(self, sub: Subsystem) -> None:
        if not self._mutable():
            raise LiveUpdateError(err=errno.EBUSY, msg="subsystems change only in NORMAL or "
                                  "UPDATED")
        if sub not in self.registered:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"subsystem {sub.name} is not "
                                  "registered")
        self.registered.remove(sub)

    def get_data(self, name: str) -> int:
        if not self._updated() or name not in self.incoming:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"no incoming data for subsystem "
                                  f"{name}")
        return self.incoming[name]

    def prepare_all(self) -> None:
        done: list[Subsystem] = []
        try:
            for sub in self.registered:
                self.data[sub.name] = sub.prepare()
                done.append(sub)
        except LiveUpdateError:
            for sub in reversed(done):
                sub.cancel(self.data.pop(sub.name))
            raise

    def freeze_all(self) -> None:
        """Freeze every subsystem; on failure the caller cancels everything."""
        for sub in self.registered:
            self.data[sub.name] = sub.freeze(self.data[sub.name])

    def cancel_all(self) -> None:
        for sub in reversed(self.registered):
            if sub.name in self.data:
                sub.cancel(self.data.pop(sub.name))

    def finish_all(self) -> None:
        for sub in self.registered:
            if sub.name in self.incoming:
                sub.finish(self.incoming[sub.name])
        self.incoming = {}
