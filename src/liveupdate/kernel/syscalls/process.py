"""Userspace processes: real OS processes, children of the kernel process.

The kernel is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a daemonized grandchild is
re-parented to it instead of escaping to the host's init; :meth:`Userspace.kill_all` finds every
process whose parent is the kernel (by /proc, since ``/proc/PID/task/*/children`` is not always
built in), signals it through a pidfd (no PID-reuse race) and reaps it, until none is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from liveupdate.abi.syscalls import SYSCALL_FD_ENV
from liveupdate.abi.wire import seqpacket_pair

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children_of(ppid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == ppid:
            out.append(int(name))
    return out


@dataclass(eq=False)
class Proc:
    popen: subprocess.Popen[bytes]
    argv: list[str]
    conn: socket.socket
    # what this process mapped (memfds): references dropped when the process is gone
    mappings: list[Any] = field(default_factory=list)


class Userspace:
    def __init__(self, serve: Callable[[socket.socket, Proc], None]) -> None:
        self._serve = serve
        self.procs: dict[int, Proc] = {}
        self._lock = threading.Lock()
        self.dying = False

    def spawn(self, argv: list[str], *, capture: bool = False, cwd: str = "/",
              stdin: int | None = subprocess.DEVNULL) -> Proc:
        kside, uside = seqpacket_pair()
        try:
            env = {SYSCALL_FD_ENV: str(uside.fileno()), "PYTHONUNBUFFERED": "1",
                   "PATH": "/usr/local/bin:/usr/bin:/bin"}
            pipe = subprocess.PIPE if capture else None
            popen = subprocess.Popen(argv, pass_fds=(uside.fileno(),), env=env, cwd=cwd,
                                     stdin=stdin, stdout=pipe, stderr=pipe)
        except OSError:
            kside.close()
            raise
        finally:
            uside.close()
        proc = Proc(popen, argv, kside)
        with self._lock:
            self.procs[popen.pid] = proc
        threading.Thread(target=self._run, args=(proc,), daemon=True).start()
        return proc

    def _run(self, proc: Proc) -> None:
        try:
            self._serve(proc.conn, proc)
        finally:
            proc.conn.close()

    def wait(self, pid: int) -> int:
        """Wait for a userspace process this kernel started; its exit status."""
        with self._lock:
            proc = self.procs.get(pid)
        if proc is None:
            return -1
        status = proc.popen.wait()
        self.reap(proc)
        return status

    def reap(self, proc: Proc) -> None:
        with self._lock:
            self.procs.pop(proc.popen.pid, None)

    def kill_all(self) -> int:
        """End every userspace process, daemonized ones included. Returns how many."""
        self.dying = True
        me, killed = os.getpid(), 0
        for _ in range(1000):  # each round reaps at least one process; bounded anyway
            pids = children_of(me)
            if not pids:
                return killed
            for pid in pids:
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
                finally:
                    os.close(fd)
            for pid in pids:
                with self._lock:
                    proc = self.procs.pop(pid, None)
                if proc is not None:
                    proc.popen.wait()
                else:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
        return killed
