"""Kernel processes: one per boot, forked by a template, and a spare forked ahead of time.

Each boot runs one kernel process with the RAM fd, one end of a SOCK_SEQPACKET link and a pipe
for its console. It is forked by the entry module's template (:class:`Template`,
:mod:`liveupdate.kernel.template`): one interpreter per machine with the kernel's code
imported, started in an empty environment, that never runs a kernel itself -- so a boot costs
a fork, not a Python start (~0.2 s of CPU each). A spare kernel process is forked ahead of
time, when the running kernel loads a kexec image, waiting for "go" -- a loaded kexec image
already sits in memory. Before "go" the machine tells it the command line it expects the
jump to carry and how many userspace spares to start ("prepare"); the kernel process
confines itself by it, starts its spares (:mod:`liveupdate.kernel.spares`), faults its page
metadata in (``PageMeta.populated``: the host's faults out of the jump) and says "ready".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from liveupdate.abi import bootparams, wire
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.ipc import fds as scm
from liveupdate.machine.console import Console
from liveupdate.machine.ram import Ram
from liveupdate.procs import Child

POWER_OFF_GRACE = 5.0  # seconds a kernel gets to end its userspace when the power is cut
FORK_TIMEOUT = 60.0  # seconds a template may take to import the kernel's code and fork it


@dataclass
class Pending:
    """A request sent to one kernel process, waiting for its reply."""

    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def answer(self, reply: dict[str, Any], payload: bytes = b"") -> None:
        self.reply, self.payload = reply, payload
        self.done.set()


@dataclass
class KernelProc:
    proc: Child
    link: socket.socket
    console: int  # read end of its console pipe
    entry: str
    cmdline: str = ""  # what it was prepared for ("prepare"): the jump must carry it
    ready: bool = False  # it said "ready" (its spares started)
    drained: threading.Event = field(default_factory=threading.Event)
    info: dict[str, Any] = field(default_factory=dict)
    # requests sent to this kernel, by id: failed when it goes, never another kernel's
    pending: dict[int, Pending] = field(default_factory=dict)

    def read_console(self, console: Console) -> None:
        """Copy its console pipe into the machine's console until the kernel is gone."""
        copy_console(self.console, console)
        with console.cond:
            self.drained.set()
            console.cond.notify_all()

    def fail_pending(self) -> None:
        for key in list(self.pending):
            pending = self.pending.pop(key, None)
            if pending is not None:
                pending.answer({"errno": errno.EIO, "message": "the kernel went away"})

    def finish(self, run: str) -> None:
        """It has ended (or is ending): reap it, drain its console, remove its runtime
        folder under ``run`` and fail whatever was still asked of it."""
        self.proc.close()
        self.link.close()
        self.drained.wait(10)
        run_dir = self.info.get("run_dir")
        if run_dir and os.path.dirname(run_dir) == run:
            shutil.rmtree(run_dir, ignore_errors=True)
        self.fail_pending()

    def discard(self, run: str) -> None:
        """Power is cut: the kernel sees its link close and ends its userspace (daemons
        included, which would otherwise outlive it holding the console); SIGKILL if it
        does not go within :data:`POWER_OFF_GRACE` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.link.shutdown(socket.SHUT_RDWR)
            try:
                self.proc.wait(POWER_OFF_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.finish(run)


def copy_console(rd: int, console: Console) -> None:
    """A pipe into the machine's console until its writers are gone; then it is closed."""
    while data := os.read(rd, 65536):
        console.append(data)
    os.close(rd)


class Template:
    """The interpreter that forks an entry module's kernel processes (its stdout and stderr
    go to the machine's console, so an import error there is seen)."""

    def __init__(self, entry: str, console: Console) -> None:
        self.entry = entry
        self.console = console
        self.sock, theirs = wire.seqpacket_pair()
        self.sock.settimeout(FORK_TIMEOUT)
        rd, wr = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-u", "-m", entry, "--template-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=wr, stderr=wr,
                env={}, cwd="/", close_fds=True)
        finally:
            os.close(wr)
            theirs.close()
        threading.Thread(target=copy_console, args=(rd, console), daemon=True).start()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def fork(self, ram_fd: int, link: socket.socket, console_wr: int) -> Child:
        """A kernel process holding ``ram_fd``, ``link`` and ``console_wr`` (and nothing of
        the template's), already this process's child. A template that fails to answer is
        closed: the next boot starts another."""
        try:
            scm.sendmsg(self.sock, b"fork", (ram_fd, link.fileno(), console_wr))
            reply = self.sock.recv(4096)
        except TimeoutError as e:
            self.close()
            raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"kernel template {self.entry}: "
                                  f"no kernel in {FORK_TIMEOUT:g} s") from e
        except OSError as e:
            self.close()
            raise LiveUpdateError(err=e.errno or errno.EIO,
                                  msg=f"kernel template {self.entry}: {e.strerror}") from e
        said: Any
        try:
            said = json.loads(reply) if reply else {"errno": errno.EIO,
                                                   "message": "exited (see the console)"}
        except ValueError:
            said = None
        if not isinstance(said, dict) or not isinstance(said.get("pid", 0), int):
            said = {"errno": errno.EPROTO, "message": f"answered {reply[:40]!r}"}
        if "pid" not in said:
            err = said.get("errno")
            raise LiveUpdateError(err=err if isinstance(err, int) else errno.EIO,
                                  msg=f"kernel template {self.entry}: {said.get('message')}")
        return Child(int(said["pid"]))

    def close(self) -> None:
        """It sees EOF and exits; killed if it does not within the grace a kernel gets."""
        self.sock.close()
        try:
            self.popen.wait(POWER_OFF_GRACE)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def template_for(templates: dict[str, Template], entry: str, console: Console) -> Template:
    """The template of ``entry`` in ``templates``, started (again) when it is not alive."""
    template = templates.get(entry)
    if template is None or not template.alive():
        if template is not None:
            template.close()
        template = templates[entry] = Template(entry, console)
    return template


def spawn(template: Template, ram_fd: int, console: Console, cmdline: str,
          spares: int) -> KernelProc:
    """A kernel process for ``template``'s entry, its code imported, prepared for
    ``cmdline`` with ``spares`` userspace spares (:func:`ready` says when), waiting for
    "go"."""
    mside, kside = wire.seqpacket_pair()
    rd, wr = os.pipe()
    try:
        child = template.fork(ram_fd, kside, wr)
    except LiveUpdateError:
        mside.close()
        os.close(rd)
        raise
    finally:
        os.close(wr)
        kside.close()
    kp = KernelProc(child, mside, rd, template.entry, cmdline)
    threading.Thread(target=kp.read_console, args=(console,), daemon=True).start()
    mside.send(wire.pack({"op": "prepare", "cmdline": cmdline, "spares": spares}))
    return kp


def ready(kp: KernelProc, timeout: float) -> bool:
    """Wait for a spawned kernel process's "ready" (its spares started) -- before its "go",
    while nothing else reads its link; at once if it said so before (a second load)."""
    deadline = time.monotonic() + timeout
    while not kp.ready and (left := deadline - time.monotonic()) > 0:
        if not select.select([kp.link], [], [], left)[0]:
            return False
        try:
            header, _ = wire.unpack(kp.link.recv(wire.SEQPACKET_BUFFER))
        except (OSError, AbiError):
            return False
        if header.get("op") == "ready":
            kp.ready = True
    return kp.ready


def service_count(disk: str) -> int:
    """The lines of the disk's service list: how many userspace spares a kernel starts."""
    try:
        with open(os.path.join(disk, "services")) as f:
            return sum(1 for line in f if line.split("#", 1)[0].strip())
    except OSError:
        return 0


def cmdline_at(ram: Ram | None, bp_phys: int) -> str:
    """The command line the boot parameters at ``bp_phys`` carry ("" if unreadable: the
    kernel says why at boot)."""
    assert ram is not None
    try:
        bp = bootparams.BootParams.decode(ram.read(bp_phys, PAGE_SIZE))
        return bp.read_cmdline(PhysMem(ram.map))
    except (AbiError, LiveUpdateError):
        return ""


def empty_folder(path: str) -> None:
    """Remove everything in ``path``, the folder itself kept (``run/``: a tmpfs for the kernel,
    empty at every boot)."""
    with os.scandir(path) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
