"""The machine's power state: :class:`State`, with every legal transition declared once in
:data:`TRANSITIONS` (qemu.qmp's ``Runstate`` is the model)."""

from __future__ import annotations

import enum
import errno

from liveupdate.errors import LiveUpdateError


class State(enum.Enum):
    OFF = "off"
    BOOTING = "booting"
    RUNNING = "running"
    JUMPING = "jumping"
    PANIC = "panic"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.OFF: frozenset({State.OFF, State.BOOTING}),
    State.BOOTING: frozenset({State.RUNNING, State.PANIC, State.OFF}),
    State.RUNNING: frozenset({State.JUMPING, State.PANIC, State.OFF}),
    State.JUMPING: frozenset({State.BOOTING, State.PANIC, State.OFF}),
    State.PANIC: frozenset({State.OFF}),
}
STOPPED = frozenset({State.OFF, State.PANIC})


def parse_states(names: object) -> list[State]:
    """The ``states`` of a ``wait_state`` request."""
    if not isinstance(names, list) or not names:
        raise LiveUpdateError(err=errno.EINVAL, msg="states must be a non-empty list")
    try:
        return [State(n) for n in names]
    except ValueError as e:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"unknown machine state: {e}") from e
