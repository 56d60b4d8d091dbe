"""The previous kernel's userspace, after a jump: kept stopped, ended once the next kernel's
live update is over.

A real kexec leaves nothing of the old userspace: no process and no teardown. The emulated
kernel's userspace is host processes. At the reboot the old kernel stops every one, waits until
each is stopped, and SIGKILLs all but those with ``lu.keep_stopped`` of shared memory resident
(64 MiB by default) -- the VMMs, whose teardown is costly (``Userspace.stop_for_kexec``); when
the old kernel process exits they are re-parented to the machine (subreaper). Before the next
kernel starts, :meth:`Orphans.bury` makes sure each is *still* (:func:`procs.still`: every
thread stopped or dying, so none runs userspace or has a syscall in progress, and none will
unless continued) -- no syscall of the old userspace (a ``bind``, a write under ``run/``) can
land after the machine empties ``run/`` for the next kernel. One found running (continued by
someone) is killed and waited for until dying. The kept ones' sockets are unreachable: ``run/``
is emptied and services bind anew; a holder of one bound to an abstract name was killed and
waited for by the old kernel. A socket a host-side client is connected to stays open until the
settle: only the VMMs are kept, and nothing of ours waits for a VMM's connection to close across
an update.

The stopped ones are ended only when the next kernel says its live update is over
(``Kernel.say_settled``: LUO FINISH, or the last incoming session released), or at the next
jump, or at power off. Ending them earlier costs the next kernel: the host's teardown of
what a process mapped runs in the exiting process's context, beside the next kernel. An 8 GiB
TCG VMM's 4 KiB host PTEs (the RAM memfd has no huge pages where ``shmem_enabled`` is
``never``) take 28-39 ms to zap (350 ms when the VMM had written the whole guest), and
killed at the jump -- even at ``SCHED_IDLE`` -- they lengthened the next kernel's luod
adoption and VMM restore by ~5 ms and most of their spread; waiting for the exit before the
jump put all of it inside every VM's pause (a VMM whose KVM VM held 4 GiB: 165 ms). Killed
after the settle, at ``SCHED_IDLE``, the teardown falls outside every pause. (8 GiB guests'
blackout came out 0.93-1.08 of 256 MiB guests' on 2 MiB pages over four runs of
``bench/bench_qemu.py``, with ``lu.keep_stopped`` at 64M.)

A machine killed outright (SIGKILL) must not leave them stopped forever, holding the RAM's
pages: a guard (``/bin/sh``, its own session, deaf to job-control and terminal signals)
holds the set of stopped pids on its stdin and SIGKILLs the last set it read when that
stdin reaches EOF -- the machine is gone. Every change of the set is written before a
process of it is killed, so the guard never kills a pid that was reaped and reused.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time

from liveupdate.machine.console import Console
from liveupdate.procs import children_of, dying, still

GUARD = ("trap '' HUP INT TERM QUIT TSTP TTIN TTOU; last=''; "
         "while IFS= read -r line; do last=$line; done; "
         "[ -n \"$last\" ] && kill -KILL $last 2>/dev/null; exit 0")


class Orphans:
    """The machine's hold on the previous kernel's userspace (see the module)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.lock = threading.Lock()
        self.stopped: set[int] = set()
        self.guard = subprocess.Popen(["/bin/sh", "-c", GUARD], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)

    def bury(self, ours: set[int], timeout: float = 10.0) -> None:
        """Before the next kernel starts: every child of the machine but ``ours`` (kernels,
        templates, the guard) is still; those stopped are kept, the rest reaped as they go.
        What an earlier kernel left stopped and never settled is ended now. After
        ``timeout`` the machine says what it left."""
        seen = self.release()  # each has its reaper: never a second one, for a reused pid
        ours = ours | {self.guard.pid}
        deadline = time.monotonic() + timeout
        kept: set[int] = set()
        while orphans := [p for p in children_of(os.getpid()) if p not in ours | seen]:
            for pid in orphans:
                seen.add(pid)
                if not still(pid):  # continued since its kernel stopped it
                    self.console.append(f"machine: pid {pid} of the previous kernel's "
                                        f"userspace was running at the jump: killed\n".encode())
                    _kill(pid)
                while not still(pid):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.console.append(f"machine: pid {pid} of the previous kernel's "
                                            f"userspace outlived its SIGKILL by {timeout:g} "
                                            "s\n".encode())
                        return self._keep(kept)
                    _exited(pid, min(left, 0.001))
                if dying(pid):
                    _reap_later(pid)
                else:
                    kept.add(pid)
        self._keep(kept)

    def release(self) -> set[int]:
        """End what is kept stopped: SIGKILL (their teardown at the ``SCHED_IDLE`` the old
        kernel gave them), reaped by threads as each exits. Returns their pids."""
        with self.lock:
            pids, self.stopped = self.stopped, set()
            if pids:
                self._tell_guard()
        for pid in pids:
            _kill(pid)
            _reap_later(pid)
        return pids

    def close(self) -> None:
        """Power is gone for good: end what is kept, then let the guard go."""
        self.release()
        with contextlib.suppress(OSError):
            if self.guard.stdin is not None:
                self.guard.stdin.close()
        self.guard.wait()

    def _keep(self, pids: set[int]) -> None:
        with self.lock:  # a new set: status() reads it without the lock
            self.stopped = self.stopped | pids
            self._tell_guard()

    def _tell_guard(self) -> None:
        try:
            assert self.guard.stdin is not None
            self.guard.stdin.write(" ".join(map(str, sorted(self.stopped))).encode() + b"\n")
            self.guard.stdin.flush()
        except (OSError, ValueError):  # the guard is gone: release() and close() still end them
            self.console.append(b"machine: the orphan guard is gone\n")


def _kill(pid: int) -> None:
    """SIGKILL a child of the machine (unreaped: its pid cannot have been reused)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap_later(pid: int) -> None:
    threading.Thread(target=_reap, args=(pid,), name=f"reap-{pid}", daemon=True).start()


def _exited(pid: int, wait: float) -> bool:
    """Whether ``pid`` has exited, waiting up to ``wait`` seconds for it (its pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], wait)[0])
    finally:
        os.close(fd)


def _reap(pid: int) -> None:
    _exited(pid, 3600)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
