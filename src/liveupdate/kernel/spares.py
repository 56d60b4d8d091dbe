"""The kernel's userspace spares: pre-imported interpreters that init adopts as its services
instead of starting a Python each (ARCHITECTURE.md, "Spares"; our own: Linux execs).

Before its "go" -- when the machine starts the next kernel's process ahead of a jump -- the
kernel process, already confined (:mod:`.confine`, :func:`liveupdate.kernel.confine.early`)
and a child subreaper, forks the spare template (:mod:`liveupdate.userspace.spare`, whose
code the kernel's own template imported: the fork stands for an exec of ``python -m`` it,
without an interpreter start and its imports -- ~0.4 s of every ``kexec_file_load`` when it
was started; an empty environment, ``/`` as its working directory, its output on a console
socket of this kernel, the kernel's file audit switched off and its modules forgotten) and
asks it for ``count`` spares. Each is this kernel's child, in its Landlock domain
and mount namespace, holding nothing but its adoption channel. The template never ran a
program of any kernel; the spares learn everything at adoption, from this kernel. A spare
not adopted dies with the kernel's userspace at the next reboot, as the template does.

:meth:`Spares.adopt` gives one to a program that the interpreter would run
(:func:`liveupdate.abi.spare.runnable`): a Popen-like :class:`procs.Child` for it, or None (no
spare left, or it cannot be adopted), and the caller starts the program as before.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

from liveupdate import procs
from liveupdate.abi import spare as abi
from liveupdate.abi.wire import seqpacket_pair
from liveupdate.ipc import fds as scm
from liveupdate.kernel import fsaudit

READY_TIMEOUT = 30.0  # seconds the template may take to import and fork its spares


def _fork_template(control: int, tty: int) -> int:
    """The spare template's pid: this process forked (twice: the template is this kernel's
    child, :func:`procs.detached`), becoming :func:`liveupdate.userspace.spare.become` --
    the fork stands for an exec of ``python -m`` :data:`abi.TEMPLATE_MODULE`, whose code
    the kernel's template imported (:func:`warm`). Before any thread of this process runs:
    the fork takes none. Output buffered here is flushed first, or the child would repeat
    it."""
    entry = importlib.import_module(abi.TEMPLATE_MODULE).become
    sys.stdout.flush()
    sys.stderr.flush()

    def body(ready: int) -> int:
        fsaudit.ALLOW.on = False  # what an exec drops: the kernel's file allowlist (a
        return int(entry(control, tty, ready))  # Python audit hook is never removed)

    return procs.detached(lambda ready: procs.exit_with(lambda: body(ready)),
                          "the spare template")


def warm() -> None:
    """In the kernel's template: import the spare template's code once (by name: the
    kernel's code does not call userspace's, a forked child runs it as an exec would)."""
    importlib.import_module(abi.TEMPLATE_MODULE)


class Spares:
    """The template and the spares it forked for this kernel."""

    def __init__(self, count: int, say: Callable[[str], None]) -> None:
        self.say = say
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._pool: list[tuple[int, socket.socket]] = []
        self.control, theirs = seqpacket_pair()
        self._tty, tty_u = socket.socketpair()
        try:
            self.template = procs.Child(_fork_template(theirs.fileno(), tty_u.fileno()))
        finally:
            theirs.close()
            tty_u.close()
        threading.Thread(target=self._forward, daemon=True).start()
        threading.Thread(target=self._fill, args=(count,), daemon=True).start()

    def _forward(self) -> None:
        """The template's output (an import error, say) to the console."""
        while data := self._tty.recv(65536):
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        self._tty.close()

    def _fill(self, count: int) -> None:
        try:
            for _ in range(count):
                scm.sendmsg(self.control, abi.ASK)
                raw, fds, _ = scm.recvmsg(self.control, 4096, 1)
                said = json.loads(raw) if raw else {"message": "the template exited"}
                if "pid" not in said or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    self.say(f"spares: none from the template: {said.get('message')}")
                    return
                with self._lock:
                    self._pool.append((int(said["pid"]), socket.socket(fileno=fds[0])))
        except (OSError, ValueError) as e:
            self.say(f"spares: the template failed: {e}")
        finally:
            self.ready.set()

    def count(self) -> int:
        with self._lock:
            return len(self._pool)

    def adopt(self, argv: list[str], env: dict[str, str], cwd: str,
              fds: tuple[int, int, int, int]) -> procs.Child | None:
        """A spare running ``argv`` with ``env`` (whose syscall fd is set here) in ``cwd``,
        holding ``fds`` (stdin, stdout, stderr, syscall connection); None when it cannot
        be done -- then nothing was taken."""
        if not abi.runnable(argv, sys.executable):
            return None
        self.ready.wait(READY_TIMEOUT)
        while True:
            with self._lock:
                if not self._pool:
                    return None
                pid, chan = self._pool.pop(0)
            said = b""
            try:
                scm.sendmsg(chan, abi.adoption(argv, env, cwd), fds)
                chan.settimeout(READY_TIMEOUT)
                said = chan.recv(len(abi.ADOPTED))
            except OSError:  # it died unadopted, or never answered: the next one
                pass
            finally:
                chan.close()
            if said == abi.ADOPTED:  # it holds the fds: the caller may close its copies
                return procs.Child(pid)
            with contextlib.suppress(ProcessLookupError):  # never two of one program
                os.kill(pid, signal.SIGKILL)
