"""One-shot fault points in luod clients, a failslab for live-update workloads.

A file ``disk/faults/<client name>`` of the machine whose ``run/`` holds luod's socket (the
disk, not ``run/``: ``run/`` is emptied at every boot, and userspace may only consume a fault
point there, never write one -- see ``kernel/confine.py``), holding an event name -- ``prepare``,
``freeze`` (both before the client's callback, so before its acknowledgement) or ``restore``
(the next kernel's hello, before anything is retrieved) -- makes that client SIGKILL itself
when the event comes, once: the file is removed first. ``luoctl demo --fault`` and the
reliability matrix (docs/reliability.md) arm them; nothing is armed otherwise, and the cost
is one failed open per event.
"""

from __future__ import annotations

import contextlib
import os
import signal

EVENTS = ("prepare", "freeze", "restore")


def path(socket_path: str, name: str) -> str:
    machine = os.path.dirname(os.path.dirname(socket_path))
    return os.path.join(machine, "disk", "faults", name)


def arm(socket_path: str, name: str, event: str) -> str:
    where = path(socket_path, name)
    os.makedirs(os.path.dirname(where), exist_ok=True)
    with open(where, "w") as f:
        f.write(event)
    return where


def fire(socket_path: str, name: str, event: str) -> None:
    where = path(socket_path, name)
    try:
        with open(where) as f:
            armed = f.read().strip()
    except OSError:
        return
    if armed != event:
        return
    with contextlib.suppress(OSError):
        os.unlink(where)
    print(f"luod client {name}: fault point {event}: killed (SIGKILL)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
