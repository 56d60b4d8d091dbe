"""The previous kernel's userspace across a real jump of the emulated machine: stopped at the
reboot; a process that mapped ``lu.keep_stopped`` bytes of memfds (here 0: every one) is kept
so by the machine (its status's ``orphans``) and ended once the next kernel says its live
update is over -- the last incoming session released (sessions), LUO FINISH (v3), or nothing
came in -- else at the next jump (``machine/orphans.py``); the others are killed at the
jump."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from contextlib import contextmanager

from liveupdate import procs
from liveupdate.kernel.reboot import KEEP_STOPPED
from liveupdate.machine.client import MachineClient
from tests.e2e import luo_prog
from tests.e2e.conftest import V3, Machine
from tests.e2e.luo_prog import update

KEEP = 'dev = k.open("/dev/liveupdate")\ns = create(dev, "keep")\npreserve(s, 1, "x")\nhold({})'
RELEASE = ('dev = k.open("/dev/liveupdate")\ns = retrieve(dev, "keep")\n'
           'out = [restore_text(s, 1), io(s, "SESSION_FINISH").get("errno", "ok")]\n'
           'os.close(s)\nprint(json.dumps(out))')


def daemon(before: str = "", first: str = "") -> str:
    """A program that leaves a process of the old userspace behind, in a session of its own,
    and prints its pid: ``before`` runs in the program, ``first`` in that process."""
    return before + f'''
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    {first or "pass"}
    os.write(w, str(os.getpid()).encode())
    for n in (0, 1, 2, r, w):
        os.close(n)
    signal.pause()
os.close(w)
print(json.dumps(int(os.read(r, 32))))
'''


LONER = daemon()  # holding nothing
# with 2 MiB of a memfd mapped and resident: its own page-table entries
BIG = daemon('view = k.mmap(memfd_with("big", 2 << 20), 2 << 20).view\n', "fill(view, 1)")


@contextmanager
def watching(pids: list[int]) -> Iterator[list[int]]:
    """pidfds of ``pids`` (unreaped children of the machine: not reused meanwhile)."""
    fds = [os.pidfd_open(p) for p in pids]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _all_exit(fds: list[int], timeout: float = 30) -> bool:
    return all(select.select([fd], [], [], timeout)[0] for fd in fds)


def _kept(m: MachineClient) -> list[int]:
    kept: list[int] = m.status()["orphans"]
    assert kept and all(procs.still(p) and not procs.dying(p) for p in kept), kept
    return kept


KEEP_ALL = "lu.keep_stopped=0"


def test_kept_stopped_until_the_last_incoming_session_is_released(lu: Machine) -> None:
    m = lu(extra=KEEP_ALL)
    luo_prog.run(m, KEEP)
    update(m)
    with watching(_kept(m)) as fds:
        assert not any(select.select([fd], [], [], 0)[0] for fd in fds)
        assert luo_prog.run(m, RELEASE) == ["x", "ok"]
        assert _all_exit(fds), "the previous userspace outlived the live update"
    assert m.status()["orphans"] == []


def test_with_nothing_incoming_the_previous_userspace_ends_at_boot(lu: Machine) -> None:
    m = lu(extra=KEEP_ALL)
    loner = luo_prog.run(m, LONER)
    with watching([loner]) as fds:
        update(m)
        assert _all_exit(fds)


def test_never_released_they_end_at_the_next_jump(lu: Machine) -> None:
    m = lu(extra=KEEP_ALL)
    luo_prog.run(m, KEEP)
    update(m)
    with watching(_kept(m)) as fds:
        luo_prog.run(m, KEEP.replace('"keep"', '"again"'))
        update(m)  # "keep" never retrieved: the first set waited for this jump
        assert _all_exit(fds)
    assert _kept(m)  # "again" came in, and waits too


V3_KEEP = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("u")
k.ftruncate(fd, 4096)
io(dev, "FD_PRESERVE", fd=fd, token=1)
io(dev, "SET_EVENT", event=0)
hold({})
'''


def test_v3_keeps_them_until_finish(v3: Machine) -> None:
    m = v3(KEEP_ALL)
    luo_prog.run(m, V3_KEEP)
    m.kexec_load(V3)
    m.kexec_exec()
    with watching(_kept(m)) as fds:
        body = ('dev = k.open("/dev/liveupdate")\n'
                'print(json.dumps(io(dev, "SET_EVENT", event=2).get("errno", "ok")))')
        assert luo_prog.run(m, body) == "ok"
        assert _all_exit(fds)


def test_below_the_threshold_they_are_killed_at_the_jump(lu: Machine) -> None:
    m = lu(extra="lu.keep_stopped=1M")
    small = luo_prog.run(m, LONER)
    big = luo_prog.run(m, BIG)
    luo_prog.run(m, KEEP)  # unsettled: what is kept stays until "keep" is released
    with watching([small]) as fds:
        assert update(m)["orphans"] == [big]
        assert _all_exit(fds)


def test_a_malformed_threshold_is_said_and_the_default_used(lu: Machine) -> None:
    m = lu(extra="lu.keep_stopped=lots")
    off = m.status()["console_bytes"]
    loner = luo_prog.run(m, LONER)
    with watching([loner]) as fds:
        update(m)
        m.wait(rf"kexec: lu\.keep_stopped=lots: not a size; {KEEP_STOPPED}", offset=off)
        assert _all_exit(fds)  # killed at the jump: it holds far below the default
