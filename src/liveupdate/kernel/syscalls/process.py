"""Userspace processes: real OS processes, children of the kernel process.

The kernel is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a daemonized grandchild is
re-parented to it instead of escaping to the host's init; :meth:`Userspace.kill_all` finds every
process whose parent is the kernel (by /proc, since ``/proc/PID/task/*/children`` is not always
built in), signals it through a pidfd (no PID-reuse race) and reaps it, until none is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.spare import SYSCALL_AT
from liveupdate.abi.syscalls import SYSCALL_FD_ENV
from liveupdate.abi.wire import seqpacket_pair
from liveupdate.kernel.syscalls import creds
from liveupdate.procs import (
    Child,
    abstract_socket_inodes,
    children_of,
    holds_socket,
    idle,
    shmem_resident,
)

if TYPE_CHECKING:
    from liveupdate.kernel.spares import Spares


@dataclass(eq=False)
class Proc:
    popen: subprocess.Popen[bytes] | Child
    argv: list[str]
    conn: socket.socket
    # what this process mapped (memfds): references dropped when the process is gone
    mappings: list[Any] = field(default_factory=list)


class Userspace:
    def __init__(self, serve: Callable[[socket.socket, Proc], None],
                 spares: Spares | None = None) -> None:
        self._serve = serve
        self.spares = spares  # adopted instead of starting a Python (kernel/spares.py)
        self.procs: dict[int, Proc] = {}
        self._lock = threading.Lock()
        self._ttys: list[socket.socket] = []
        self._out_lock = threading.Lock()
        self._partial: dict[socket.socket, bytes] = {}  # a line not yet ended, per tty
        self.dying = False

    def _forward(self, tty: socket.socket) -> None:
        """Copy a process's output to the console until every holder closed it."""
        while True:
            try:
                data = tty.recv(65536)
            except OSError:
                return
            if not data:
                break
            self._write(tty, data)
        self._write(tty, b"", end=True)
        with self._out_lock:
            if tty in self._ttys:
                self._ttys.remove(tty)
        tty.close()

    def _write(self, tty: socket.socket, data: bytes, end: bool = False) -> None:
        """Whole lines, as a tty's line discipline hands them on: a line written in pieces
        (``print`` writes the text, then the newline) is not cut by the kernel's own lines
        or another process's; what is left at the end goes as it is."""
        with self._out_lock:
            data = self._partial.pop(tty, b"") + data
            cut = len(data) if end or len(data) > 65536 else data.rfind(b"\n") + 1
            if data[cut:]:
                self._partial[tty] = data[cut:]
            if cut:
                sys.stdout.buffer.write(data[:cut])
                sys.stdout.flush()

    def _drain_ttys(self) -> None:
        """Everything stopped processes wrote, to the console (nothing is lost)."""
        for tty in list(self._ttys):
            with contextlib.suppress(OSError):
                while True:
                    data = tty.recv(65536, socket.MSG_DONTWAIT)
                    if not data:
                        break
                    self._write(tty, data)
            self._write(tty, b"", end=True)

    def spawn(self, argv: list[str], *, capture: bool = False, cwd: str = "/",
              stdin: int | None = subprocess.DEVNULL) -> Proc:
        """Start ``argv`` with its syscall connection. Unless ``capture``, its output goes to
        the console through a socket the kernel reads (a "tty" of this kernel): the
        machine's console pipe is the kernel's alone, so a dying process never holds it."""
        kside, uside = seqpacket_pair()
        creds.enable(kside)  # before the process runs: each call names its sender
        tty_k, tty_u = (None, None) if capture else socket.socketpair()
        try:
            env = {SYSCALL_FD_ENV: str(uside.fileno()), "PYTHONUNBUFFERED": "1",
                   "PATH": "/usr/local/bin:/usr/bin:/bin"}
            popen: subprocess.Popen[bytes] | Child | None = None if tty_u is None else \
                self._adopt(argv, env, cwd, stdin, tty_u, uside)
            if popen is None:
                out = subprocess.PIPE if tty_u is None else tty_u.fileno()
                popen = subprocess.Popen(argv, pass_fds=(uside.fileno(),), env=env, cwd=cwd,
                                         stdin=stdin, stdout=out, stderr=out)
        except OSError:
            kside.close()
            if tty_k is not None:
                tty_k.close()
            raise
        finally:
            uside.close()
            if tty_u is not None:
                tty_u.close()
        if tty_k is not None:
            self._ttys.append(tty_k)
            threading.Thread(target=self._forward, args=(tty_k,), daemon=True).start()
        proc = Proc(popen, argv, kside)
        with self._lock:
            self.procs[popen.pid] = proc
        threading.Thread(target=self._run, args=(proc,), daemon=True).start()
        return proc

    def _adopt(self, argv: list[str], env: dict[str, str], cwd: str, stdin: int | None,
               tty: socket.socket, conn: socket.socket) -> Child | None:
        if self.spares is None or stdin != subprocess.DEVNULL:
            return None
        with open(os.devnull, "rb") as null:
            return self.spares.adopt(argv, {**env, SYSCALL_FD_ENV: str(SYSCALL_AT)}, cwd,
                                     (null.fileno(), tty.fileno(), tty.fileno(),
                                      conn.fileno()))

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
        """Forget a process that was waited for (an adopted spare's pidfd closed)."""
        with self._lock:
            self.procs.pop(proc.popen.pid, None)
        if isinstance(proc.popen, Child):
            proc.popen.close()

    def maps(self) -> list[dict[str, Any]]:
        """Each live process's mapped memfds and the physical extents behind them -- what
        ``/proc/PID/maps`` with ``/proc/PID/pagemap`` (PFNs, for root) tell on Linux. A host
        tool proves zero copy with it without asking the process. Call under the kernel
        lock."""
        with self._lock:
            procs = list(self.procs.values())
        out = []
        for p in procs:
            if p.popen.poll() is not None:
                continue
            files = {mf.ino: mf for mf in p.mappings}
            out.append({"pid": p.popen.pid, "argv": p.argv, "memfds": [
                {"name": mf.name, "ino": mf.ino, "size": mf.size,
                 "extents": mf.extents(0, -(-mf.size // PAGE_SIZE))}
                for mf in files.values()]})
        return out

    def stop_for_kexec(self, keep_mapped: int | None) -> tuple[int, int]:
        """The reboot's way: stop every userspace process and wait until each is stopped (a
        stopped process writes nothing more, to RAM or anywhere, and has no syscall in
        progress), forward what they wrote, then SIGKILL them without waiting for the host
        to tear them down -- except, unless ``keep_mapped`` is None, a process with that
        many bytes or more of shared memory mapped and resident (a VMM's guest memory:
        ``RssShmem``, the host PTEs its teardown zaps), which is left stopped. Returns how
        many were stopped, and how many left so.

        A real kexec leaves no trace of the old userspace; here it is host processes, and the
        host's teardown of a killed one runs beside the next kernel and grows with what it
        has mapped (an 8 GiB VMM's 4 KiB PTEs: tens of ms). So the machine, whose children they
        become when this process exits, ends the kept ones only once the next kernel's live
        update is over (:mod:`liveupdate.machine.orphans`). The rest are killed now, as a
        real kexec ends every connection: a host-side client of the old luod sees its
        socket close at the jump, not when the next kernel's update settles. A socket bound
        to an abstract name is the host network namespace's, and the next kernel's bind of
        the name must not find it: its holder is killed, whatever it mapped, and waited for
        (the socket goes in ``exit_files``, after the teardown). Every process left alive
        is at ``SCHED_IDLE``, so a teardown takes a core only when nothing else wants one.
        Daemonized processes are found as in :meth:`kill_all` (subreaper)."""
        self.dying = True
        me, stopped = os.getpid(), set()
        for _ in range(1000):  # a stopped process forks no more: this converges
            pids = [p for p in children_of(me) if p not in stopped]
            if not pids:
                break
            fds = {}
            for pid in pids:  # all stopped at once, then each waited for: the slowest, not
                try:  # the sum (a VMM with 4 GiB mapped took tens of ms to stop)
                    fds[pid] = os.pidfd_open(pid)
                    signal.pidfd_send_signal(fds[pid], signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            for pid, fd in fds.items():
                try:
                    os.waitid(os.P_PIDFD, fd, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
                except (ProcessLookupError, ChildProcessError):
                    pass
                finally:
                    os.close(fd)
                stopped.add(pid)
        self._drain_ttys()
        abstract = abstract_socket_inodes()
        holders = [p for p in stopped if holds_socket(p, abstract)]
        kept = 0
        for pid in stopped:
            if pid not in holders:
                idle(pid)
            if pid in holders or keep_mapped is None or shmem_resident(pid) < keep_mapped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            else:
                kept += 1
        for pid in holders:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                fd = os.pidfd_open(pid)
                try:
                    os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOWAIT)
                finally:
                    os.close(fd)
        return len(stopped), kept

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
                    self.reap(proc)
                else:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
        return killed
