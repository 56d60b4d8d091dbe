"""Kernel processes: one per boot, and a spare started ahead of time.

Each boot runs one kernel process, started with the RAM fd, one end of a SOCK_SEQPACKET link
and a pipe for its console, in an empty environment. A spare kernel process is started ahead
of time, when the running kernel loads a kexec image, with its code imported, waiting for "go"
-- a loaded kexec image already sits in memory -- so a jump costs no Python start-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from liveupdate.abi import wire
from liveupdate.machine.console import Console

POWER_OFF_GRACE = 5.0  # seconds a kernel gets to end its userspace when the power is cut


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
    popen: subprocess.Popen[bytes]
    link: socket.socket
    console: int  # read end of its console pipe
    entry: str
    drained: threading.Event = field(default_factory=threading.Event)
    info: dict[str, Any] = field(default_factory=dict)
    # requests sent to this kernel, by id: failed when it goes, never another kernel's
    pending: dict[int, Pending] = field(default_factory=dict)

    def read_console(self, console: Console) -> None:
        """Copy its console pipe into the machine's console until the kernel is gone."""
        while True:
            data = os.read(self.console, 65536)
            if not data:
                break
            console.append(data)
        os.close(self.console)
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
        self.popen.wait()
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
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.link.shutdown(socket.SHUT_RDWR)
            try:
                self.popen.wait(POWER_OFF_GRACE)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.finish(run)


def spawn(ram_fd: int, entry: str, console: Console) -> KernelProc:
    """A kernel process for ``entry`` (a module), its code imported, waiting for "go"."""
    mside, kside = wire.seqpacket_pair()
    rd, wr = os.pipe()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-u", "-m", entry, "--ram-fd", str(ram_fd),
             "--link-fd", str(kside.fileno())],
            pass_fds=(ram_fd, kside.fileno()), stdin=subprocess.DEVNULL,
            stdout=wr, stderr=wr, env={}, cwd="/", close_fds=True)
    finally:
        os.close(wr)
        kside.close()
    kp = KernelProc(popen, mside, rd, entry)
    threading.Thread(target=kp.read_console, args=(console,), daemon=True).start()
    return kp
