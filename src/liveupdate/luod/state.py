"""luod's orchestration state machine (the seed's): Normal -> Prepared -> Frozen -> (kexec)
-> Updated -> Normal, with events prepare, freeze, finish, cancel -- declared once; and the
phase guards of luod's operations, declared once too (:data:`GUARDS`, applied by
:func:`guarded`, as qemu.qmp's ``@require(Runstate)``)."""

from __future__ import annotations

import enum
import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from liveupdate.errors import LiveUpdateError


class Phase(enum.Enum):
    NORMAL = "normal"
    PREPARED = "prepared"
    FROZEN = "frozen"
    UPDATED = "updated"


class Event(enum.Enum):
    PREPARE = "prepare"
    FREEZE = "freeze"
    FINISH = "finish"
    CANCEL = "cancel"


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.NORMAL, Event.PREPARE): Phase.PREPARED,
    (Phase.PREPARED, Event.FREEZE): Phase.FROZEN,
    (Phase.PREPARED, Event.CANCEL): Phase.NORMAL,
    (Phase.FROZEN, Event.CANCEL): Phase.NORMAL,
    (Phase.UPDATED, Event.FINISH): Phase.NORMAL,
}


def next_phase(phase: Phase, event: Event) -> Phase:
    nxt = TRANSITIONS.get((phase, event))
    if nxt is None:
        raise LiveUpdateError(err=errno.EBUSY, msg=f"luod: cannot {event.value} while "
                              f"{phase.value}")
    return nxt


@dataclass(frozen=True)
class Guard:
    """Which phases an operation may start in, and the error otherwise. ``exclusive``: it
    also runs alone (luod's ``busy``: a load or an update at a time), EBUSY naming what
    runs."""

    phases: frozenset[Phase]
    err: int
    why: str  # ``{state}``: the running operation or the phase
    exclusive: bool = False


GUARDS: dict[str, Guard] = {
    "load": Guard(frozenset({Phase.NORMAL}), errno.EBUSY, "luod is {state}", exclusive=True),
    "update": Guard(frozenset({Phase.NORMAL}), errno.EBUSY, "luod is {state}", exclusive=True),
    "cancel": Guard(frozenset({Phase.PREPARED, Phase.FROZEN}), errno.EINVAL,
                    "nothing to cancel: luod is {state}"),
    "finish": Guard(frozenset({Phase.UPDATED}), errno.EINVAL,
                    "nothing to finish: luod is {state}"),
}


class Guarded(Protocol):
    """What :func:`guarded` needs of the object whose methods it guards."""

    phase: Phase
    busy: str

    def claim(self, what: str, guard: Guard) -> Any: ...


P = ParamSpec("P")
R = TypeVar("R")
G = TypeVar("G", bound=Guarded)


def check(guard: Guard, phase: Phase, busy: str) -> None:
    """The guard's error when ``phase`` (and, exclusive, ``busy``) do not allow it."""
    if phase not in guard.phases or (guard.exclusive and busy):
        state = busy if guard.exclusive and busy else phase.value
        raise LiveUpdateError(err=guard.err, msg=guard.why.format(state=state))


def guarded(op: str) -> Callable[[Callable[Concatenate[G, P], R]],
                                 Callable[Concatenate[G, P], R]]:
    """Run the method only in the phases :data:`GUARDS` allows ``op`` (the owner's
    ``claim`` checks under its lock and, for an exclusive op, holds ``busy`` meanwhile)."""
    guard = GUARDS[op]

    def wrap(fn: Callable[Concatenate[G, P], R]) -> Callable[Concatenate[G, P], R]:
        @functools.wraps(fn)
        def run(self: G, /, *args: P.args, **kwargs: P.kwargs) -> R:
            with self.claim(op, guard):
                return fn(self, *args, **kwargs)

        run.guard = guard  # type: ignore[attr-defined]
        return run

    return wrap
