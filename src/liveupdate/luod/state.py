"""luod's orchestration state machine (the seed's): Normal -> Prepared -> Frozen -> (kexec)
-> Updated -> Normal, with events prepare, freeze, finish, cancel -- declared once."""

from __future__ import annotations

import enum
import errno

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
