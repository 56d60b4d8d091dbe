"""The machine buries the previous kernel's userspace: the next kernel waits until each old
process is dying on every thread, not until the host has torn its memory down."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

from liveupdate import procs
from liveupdate.machine.console import Console
from liveupdate.machine.kernels import bury_orphans

SLEEPER = [sys.executable, "-c", "import signal; signal.pause()"]


def _console(tmp_path: Path) -> Console:
    return Console(str(tmp_path / "console"), threading.Condition())


def _others() -> set[int]:
    return set(procs.children_of(os.getpid()))


def test_a_live_process_is_not_dying_and_a_killed_one_is(tmp_path: Path) -> None:
    p = subprocess.Popen(SLEEPER)
    try:
        assert not procs.dying(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        fd = os.pidfd_open(p.pid)
        select.select([fd], [], [])  # exited, not yet reaped: a zombie
        os.close(fd)
        assert procs.dying(p.pid)
    finally:
        p.kill()
        p.wait()
    assert procs.dying(p.pid)  # gone altogether


def test_an_orphan_that_still_runs_holds_the_jump_and_is_named(tmp_path: Path) -> None:
    ours = _others()
    p = subprocess.Popen(SLEEPER)
    try:
        console = _console(tmp_path)
        bury_orphans(ours, console, timeout=0.2)
        assert f"pid {p.pid} of the previous kernel's userspace outlived" in \
            bytes(console.tail).decode()
    finally:
        p.kill()
        p.wait()


def test_killed_orphans_are_buried_and_reaped(tmp_path: Path) -> None:
    ours = _others()
    kids = [subprocess.Popen(SLEEPER) for _ in range(3)]
    for k in kids:
        os.kill(k.pid, signal.SIGKILL)
    console = _console(tmp_path)
    bury_orphans(ours, console, timeout=30)
    assert b"outlived" not in bytes(console.tail)
    reapers = {t.name: t for t in threading.enumerate()}
    for k in kids:  # the machine's reaper threads, not us, reap them
        if (t := reapers.get(f"reap-{k.pid}")) is not None:  # else it has finished
            t.join(30)
        assert not os.path.exists(f"/proc/{k.pid}")
