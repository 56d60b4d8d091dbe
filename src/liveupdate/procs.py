"""Process trees, for the kernel process (ending its userspace) and the machine (reaping
what a kernel left dying): subreaper status, children by /proc (``/proc/PID/task/*/
children`` is not always built in), and a handle on an adopted child."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants are re-parented here, not to the host's init."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


PF_EXITING = 0x4  # include/linux/sched.h: set by exit_signals() as do_exit() begins


def dying(pid: int) -> bool:
    """Whether ``pid`` has entered ``do_exit()`` on every thread (or is gone): it never runs
    userspace again and no syscall of it is still in progress, only the host's teardown
    (``exit_mm``: its mappings, a KVM VM's page tables) is left. ``/proc/PID/task/*/stat``
    field 9, the task flags."""
    return _every_thread(pid, stopped_too=False)


def still(pid: int) -> bool:
    """Whether every thread of ``pid`` is dying (:func:`dying`) or stopped: a thread in a
    group stop (state ``T``) or a trace stop (``t``) got there delivering a signal, on its
    way back to userspace, so none has a syscall in progress; it runs again only if
    continued."""
    return _every_thread(pid, stopped_too=True)


def _every_thread(pid: int, stopped_too: bool) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        fields = stat_fields(f"/proc/{pid}/task/{tid}/stat")  # [] once that thread is gone
        if len(fields) <= 6 or int(fields[6]) & PF_EXITING:
            continue
        if not (stopped_too and fields[0] in (b"T", b"t")):
            return False
    return True


def shmem_resident(pid: int) -> int:
    """Bytes of shared memory ``pid`` has mapped and resident (``RssShmem`` of
    ``/proc/PID/status``: its page-table entries onto shmem, memfds included); 0 if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssShmem:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def stat_fields(path: str) -> list[bytes]:
    """The fields of a ``stat`` file after the command name (state first); [] if gone.
    Plain ``os`` calls: :func:`children_of` reads one per process of the host, twice in
    the reboot's stop of userspace (inside the pause), and ``open()``'s buffered file
    objects cost half of that."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        stat = os.read(fd, 4096)  # one read: the kernel renders the file whole
    except OSError:
        return []
    finally:
        os.close(fd)
    return stat[stat.rfind(b")") + 2 :].split()


def abstract_socket_inodes() -> set[int]:
    """The inodes of the Unix sockets bound to an abstract name in this network namespace
    (``/proc/net/unix``: a path that starts with ``@``)."""
    out = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7].startswith("@"):
                    out.add(int(fields[6]))
    except OSError:
        pass
    return out


def holds_socket(pid: int, inodes: set[int]) -> bool:
    """Whether ``pid`` still holds one of the sockets ``inodes`` (its fds; False when gone)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False


def idle(pid: int) -> None:
    """Every thread of ``pid`` to ``SCHED_IDLE`` (a thread gone meanwhile is skipped): a
    killed process's teardown then takes a core only when nothing else wants one."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))


def children_of(ppid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = stat_fields(f"/proc/{name}/stat")
        if len(fields) > 1 and int(fields[1]) == ppid:
            out.append(int(name))
    return out


class Child:
    """A child process known by pid -- one this process did not fork itself but adopted as a
    subreaper (a kernel forked by its template, a spare a kernel adopted): ``subprocess.Popen``'s
    ``pid``, ``poll``, ``wait`` and ``kill``, through a pidfd, so a signal never reaches a
    recycled pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _reap(self, block: bool) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
                except ChildProcessError:  # not ours (the machine is no subreaper) or
                    pid, status = self.pid, -1  # reaped elsewhere: gone, status unknown
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status) if status >= 0 else -1
            return self.returncode

    def poll(self) -> int | None:
        return self._reap(block=False)

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status, once its pidfd says it exited: the lock is not held while
        waiting, so :meth:`poll` and :meth:`kill` answer meanwhile (the reap then finds a
        zombie and does not block)."""
        if self.returncode is None:
            waiter = select.poll()  # poll, not select: a pidfd may be numbered past 1023
            waiter.register(self.pidfd, select.POLLIN)
            if not waiter.poll(-1 if timeout is None else timeout * 1000):
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        code = self._reap(block=True)
        assert code is not None
        return code

    def kill(self) -> None:
        with self._lock, contextlib.suppress(ProcessLookupError):
            if self.returncode is None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        """Reaped, and its pidfd closed: call once nobody waits on it any more."""
        self.wait()
        with self._lock:
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1


def freeze_heap() -> None:
    """In a template, before it forks: everything it allocated so far (its imports) moves
    to the collector's permanent generation (``gc.freeze``). A forked child's collections
    then never walk it: a full one walked every imported object, wrote to each header and
    so copied every page of the template's heap -- 10-40 ms of a kernel's boot or a VMM's
    restore, inside the VMs' pause, at a moment no one chooses."""
    gc.collect()
    gc.freeze()


def settle(place: dict[int, int], ready: int) -> None:
    """In a forked child that must hold only what it was given: each fd ``place[n]`` at
    number ``n``, every other fd closed, then its pid said on ``ready`` (closed with the
    rest) -- the parent of :func:`detached` reads it. Copies go above every number being
    replaced first, so no ``dup2`` clobbers a source."""
    top = max(place, default=-1) + 1
    copies = {n: fcntl.fcntl(fd, fcntl.F_DUPFD, top) for n, fd in place.items()}
    ready = fcntl.fcntl(ready, fcntl.F_DUPFD, top)
    for n, fd in copies.items():
        os.dup2(fd, n)
    ready = os.dup2(ready, top)
    os.closerange(top + 1, os.sysconf("SC_OPEN_MAX"))
    os.write(ready, str(os.getpid()).encode())
    os.close(ready)


def detached(body: Callable[[int], None], what: str) -> int:
    """Fork twice: the grandchild runs ``body(ready)`` (it never returns) and writes its pid
    into ``ready`` once it holds only what it should, then closes it; the caller reads to
    EOF, then reaps the middle process -- after which (``exit_notify`` has run) the
    grandchild is re-parented to the nearest subreaper. EAGAIN when it said no pid."""
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if middle == 0:
        try:
            if os.fork() == 0:
                body(w)  # never returns
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb", closefd=False) as f:
            said = f.read()
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    if not said.isdigit():
        raise OSError(errno.EAGAIN, f"{what} did not start")
    return int(said)


def exit_with(body: Callable[[], int | None]) -> NoReturn:
    """In a forked child: run ``body`` and leave with its status, never back into the
    parent's code -- SystemExit's code, 1 for any other exception (its traceback printed when
    stderr still takes it), after flushing stdio."""
    code = 1
    try:
        code = body() or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
