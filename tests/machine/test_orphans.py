"""The machine's hold on the previous kernel's userspace (``machine/orphans.py``): before the
next kernel starts each old process is still -- stopped or dying on every thread -- the
stopped ones are kept until released, a running one is killed, and a machine killed outright
leaves none of them behind."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdate import procs
from liveupdate.machine.console import Console
from liveupdate.machine.orphans import Orphans

SLEEPER = [sys.executable, "-c", "import signal; signal.pause()"]


@pytest.fixture
def orphans(tmp_path: Path) -> Iterator[Orphans]:
    o = Orphans(Console(str(tmp_path / "console"), threading.Condition()))
    yield o
    o.close()


def _others() -> set[int]:
    return set(procs.children_of(os.getpid()))


def _stopped(p: subprocess.Popen[bytes]) -> None:
    os.kill(p.pid, signal.SIGSTOP)
    os.waitid(os.P_PID, p.pid, os.WSTOPPED | os.WNOWAIT)


def _exits(pid: int, timeout: float = 30) -> bool:
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _reaped(pid: int) -> None:
    """The machine's reaper thread for ``pid`` has run: not a zombie of ours any more."""
    if (t := {t.name: t for t in threading.enumerate()}.get(f"reap-{pid}")) is not None:
        t.join(30)
    assert not os.path.exists(f"/proc/{pid}")


def test_a_process_is_still_when_stopped_or_dying_not_when_running() -> None:
    p = subprocess.Popen(SLEEPER)
    try:
        assert not procs.still(p.pid) and not procs.dying(p.pid)
        _stopped(p)
        assert procs.still(p.pid) and not procs.dying(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        assert _exits(p.pid)  # exited, not yet reaped: a zombie
        assert procs.still(p.pid) and procs.dying(p.pid)
    finally:
        p.kill()
        p.wait()
    assert procs.dying(p.pid)  # gone altogether


def test_stopped_orphans_are_kept_until_released(orphans: Orphans) -> None:
    ours = _others() | {orphans.guard.pid}
    kids = [subprocess.Popen(SLEEPER) for _ in range(2)]
    for k in kids:
        _stopped(k)
    orphans.bury(ours, timeout=30)
    assert orphans.stopped == {k.pid for k in kids}
    assert all(procs.still(k.pid) and not procs.dying(k.pid) for k in kids)
    assert orphans.release() == {k.pid for k in kids}
    assert orphans.stopped == set()
    for k in kids:
        _reaped(k.pid)


def test_an_orphan_found_running_is_killed_and_named(orphans: Orphans) -> None:
    ours = _others() | {orphans.guard.pid}
    p = subprocess.Popen(SLEEPER)
    orphans.bury(ours, timeout=30)
    assert orphans.stopped == set()
    assert f"pid {p.pid} of the previous kernel's userspace was running at the jump: " \
           "killed" in bytes(orphans.console.tail).decode()
    _reaped(p.pid)


def test_the_next_jump_ends_what_an_earlier_one_kept(orphans: Orphans) -> None:
    ours = _others() | {orphans.guard.pid}
    first = subprocess.Popen(SLEEPER)
    _stopped(first)
    orphans.bury(ours, timeout=30)
    second = subprocess.Popen(SLEEPER)
    _stopped(second)
    orphans.bury(ours, timeout=30)
    assert orphans.stopped == {second.pid}
    _reaped(first.pid)
    assert procs.still(second.pid) and not procs.dying(second.pid)


STAND_IN = r'''
import os, signal, subprocess, sys, threading
from liveupdate.machine.console import Console
from liveupdate.machine.orphans import Orphans
o = Orphans(Console(sys.argv[1], threading.Condition()))
kid = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
os.kill(kid.pid, signal.SIGSTOP)
os.waitid(os.P_PID, kid.pid, os.WSTOPPED | os.WNOWAIT)
o.bury({o.guard.pid}, timeout=30)
print(sorted(o.stopped)[0], flush=True)
signal.pause()
'''


def test_a_machine_killed_outright_leaves_no_stopped_process(tmp_path: Path) -> None:
    machine = subprocess.Popen([sys.executable, "-c", STAND_IN, str(tmp_path / "console")],
                               stdout=subprocess.PIPE)
    assert machine.stdout is not None
    kept = int(machine.stdout.readline())
    fd = os.pidfd_open(kept)  # the kept process, before its machine goes
    try:
        assert procs.still(kept) and not procs.dying(kept)
        machine.kill()
        machine.wait()
        assert select.select([fd], [], [], 30)[0], "the kept process outlived its machine"
    finally:
        os.close(fd)
