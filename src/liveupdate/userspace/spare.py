"""Userspace spares: pre-imported interpreters that a kernel adopts as its services
(ARCHITECTURE.md, "Spares"), so no interpreter start sits inside a VM's pause.

The *template*: the kernel forks one before its "go" (:mod:`liveupdate.kernel.spares`) from
its own process, whose template imported this module, into :func:`become` -- as if it had
started ``python -u -m liveupdate.userspace.spare --control-fd N``, which is what
:func:`main` serves, without the interpreter start --, inside its own confinement, in an
empty environment with its output on a console socket of that kernel. It imports the
userspace programs' code (this module's imports) and never runs any of them; for each request
on its control socket (SOCK_SEQPACKET) it forks a *spare* and answers with the spare's pid and
the kernel's end of the spare's adoption channel (SCM_RIGHTS). It forks twice and reaps the
middle process first, as the kernel template does, so a spare is by then the kernel's child
(the kernel is a child subreaper).

A spare holds one fd, its adoption channel (stdio too is closed), and nothing else that
import did not make: the template's environment is empty and it has run no program. The
adoption (:mod:`liveupdate.abi.spare`) carries everything the program will know: argv, the
environment, the working directory, and its fds -- stdin, stdout, stderr and the syscall
connection (at :data:`SYSCALL_AT`). The spare puts them in place, closes the channel and runs
the program as ``python`` would: ``-m MODULE``, ``-c CODE`` or a script path, ``sys.path[0]``
set as the interpreter sets it, exiting with the program's status. Deviation from an exec:
``/proc/PID/cmdline`` keeps the template's argv (Python cannot rewrite it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
import socket
import sys
import warnings

# the userspace programs the template imports once (their code only: nothing runs)
import liveupdate.luod.daemon
import liveupdate.luod.preflight  # luod imports it at its first load: 60-180 ms of a cycle
import liveupdate.userspace.kvcache
import liveupdate.vmm.tcg  # unicorn: 40-80 ms of a TCG VMM's restore when imported there
import liveupdate.vmm.vmm  # noqa: F401
from liveupdate import procs
from liveupdate.abi.spare import ADOPT_FDS, ADOPTED, MAX_RECORD, SYSCALL_AT, decode_adoption
from liveupdate.ipc import fds as scm


def serve(control: socket.socket) -> None:
    """Fork a spare for each request until the kernel closes ``control``."""
    while True:
        try:
            req = control.recv(64)
        except OSError:
            return
        if not req:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = _fork(theirs, control)
            scm.sendmsg(control, json.dumps({"pid": pid}).encode(), (ours.fileno(),))
        except OSError as e:
            control.send(json.dumps({"errno": e.errno, "message": str(e)}).encode())
        finally:
            ours.close()
            theirs.close()


def _fork(channel: socket.socket, control: socket.socket) -> int:
    """The spare's pid once it holds only ``channel`` and the kernel is its parent."""
    return procs.detached(lambda ready: procs.exit_with(lambda: _wait(channel.fileno(), ready)),
                          "the spare")


def _wait(channel: int, ready: int) -> int:
    """In the spare: keep the channel alone, say the pid, wait to be adopted; the adopted
    program's exit status (:func:`procs.exit_with`).

    The spare keeps sharing the template's pages copy-on-write, and its program takes those
    faults in its first steps, inside the VMs' pause (luod ~1100 between its adoption and
    its socket bound). Copying them ahead (``madvise(MADV_POPULATE_WRITE)`` on each shared
    run from ``/proc/self/pagemap``) was tried and left: before the pid is said, one VM's
    blackout fell 0.040 -> 0.034 s, but with two VMs and the cache it rose 0.068 -> 0.083
    s and back-to-back cycles fell 182 -> 126 a minute -- each process killed at the jump
    then frees its private copies beside the next kernel, and every refill pays the copy;
    side by side after the pid, or by a ``SCHED_IDLE`` thread stopped at the adoption, the
    copies ran into the next pause."""
    procs.settle({0: channel}, ready)  # the lowest number: every other fd is closed
    return _adopted(socket.socket(fileno=0))


def _adopted(channel: socket.socket) -> int:
    """Take what the kernel gives and run the program; its exit status. A channel closed
    unused (the kernel went) ends the spare."""
    try:
        raw, fds, _ = scm.recvmsg(channel, MAX_RECORD, ADOPT_FDS)
    except OSError:
        return 0
    if not raw or len(fds) != ADOPT_FDS:
        return 0
    argv, env, cwd = decode_adoption(raw)
    held = [os.dup2(fd, n) if fd != n else n for n, fd in
            zip((1 << 10, (1 << 10) + 1, (1 << 10) + 2, (1 << 10) + 3), fds, strict=True)]
    for fd in fds:
        os.close(fd)
    channel.send(ADOPTED)  # it holds them: the kernel's copies may go
    channel.close()
    for n, fd in enumerate(held):
        os.dup2(fd, SYSCALL_AT if n == 3 else n)
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    return _run(argv)


def _run(argv: list[str]) -> int:
    """``argv[1:]`` as ``python`` runs it (``argv[0]`` is the interpreter)."""
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        sys.path[0] = os.getcwd()
        # a preloaded module runs afresh as __main__, as ``-m`` runs it: runpy's warning
        # that it is also in sys.modules (under its own name) says nothing here
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    elif argv[1] == "-c":
        sys.argv = ["-c", *argv[3:]]
        sys.path[0] = ""
        exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = argv[1:]
        sys.path[0] = os.path.dirname(os.path.abspath(argv[1]))
        runpy.run_path(argv[1], run_name="__main__")
    return 0


CONTROL_AT = 3  # where a forked template keeps its control socket


def become(control: int, tty: int, ready: int) -> int:
    """The template, forked by a kernel that has this module imported (its template imported
    it: the fork stands for an exec of ``python -m`` this module, without the ~0.4 s of an
    interpreter start and the imports in every ``kexec_file_load``). Take what a started
    template holds -- the control socket, the console on 1 and 2, ``/dev/null`` on 0, an
    empty environment, ``/`` -- close everything else, forget the kernel's own modules (its
    code is not userspace's to call), say the pid on ``ready`` and serve; the exit status
    (:func:`procs.exit_with`)."""
    os.environ.clear()  # unsetenv each: the C environment too
    os.chdir("/")
    for name in [m for m in sys.modules if m.startswith(KERNEL_SIDE)]:
        del sys.modules[name]
    if isinstance(sys.stdout, io.TextIOWrapper):  # as python -u: the console sees it at once
        sys.stdout.reconfigure(line_buffering=True)
    procs.freeze_heap()  # the spares it forks collect only what their program makes
    null = os.open(os.devnull, os.O_RDONLY)
    procs.settle({0: null, 1: tty, 2: tty, CONTROL_AT: control}, ready)
    serve(socket.socket(fileno=CONTROL_AT))
    return 0


KERNEL_SIDE = ("liveupdate.kernel", "liveupdate.machine")


def main() -> None:
    ap = argparse.ArgumentParser(prog="liveupdate-spare")
    ap.add_argument("--control-fd", type=int, required=True)
    args = ap.parse_args()
    serve(socket.socket(fileno=args.control_fd))


if __name__ == "__main__":
    main()
