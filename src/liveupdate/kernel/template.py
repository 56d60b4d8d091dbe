"""The kernel process's template: an interpreter with the kernel's code imported that never
runs a kernel, and forks one for each boot (ARCHITECTURE.md, "Spares").

A fresh interpreter per boot paid ~0.2 s of CPU for Python and the kernel's imports (numpy
among them) at every boot and every kexec. The machine starts one template per kernel entry
module instead and asks it, over a SOCK_SEQPACKET pair, for a kernel: the request carries
three fds -- RAM, the kernel's end of its link and the write end of its console pipe -- and
the reply names the kernel's pid.

What a forked kernel holds is what a freshly started one held, and no more:

* fds: the template never opens a file; the kernel gets RAM at :data:`RAM_FD`, its link at
  :data:`LINK_FD`, its console on 1 and 2 and ``/dev/null`` on 0, and every other fd
  (the template's control socket among them) is closed before the kernel's code runs;
* memory: the template has only imported modules; every module-level value is what import
  made it, as in a new interpreter (the filesystem audit's allowlist included: it is
  declared from the command line in RAM at boot, :func:`liveupdate.kernel.confine.declare`);
* environment, cwd, rlimits: the machine starts the template with an empty environment in
  ``/``, as it started kernels;
* parent: the template forks twice and reaps the middle process before it reports the
  kernel's pid, so the kernel is by then re-parented to the machine (a child subreaper,
  ``PR_SET_CHILD_SUBREAPER``) -- the machine reaps it and waits for it as its own child.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable

from liveupdate import procs
from liveupdate.ipc import fds as scm

RAM_FD, LINK_FD = 3, 4  # where a forked kernel finds its RAM and its link
REQUEST_FDS = 3  # RAM, the link's kernel end, the console's write end


def serve(control: socket.socket, run: Callable[[int, int], None]) -> None:
    """Fork a kernel for each request until the machine closes ``control``. A request with
    the wrong fds is answered with EINVAL and its fds closed; a failed fork with its errno."""
    while True:
        try:
            _, got, _ = scm.recvmsg(control, 64, REQUEST_FDS)
        except OSError:
            return
        if not got:
            return  # EOF (a request always carries fds): the machine is gone
        reply: dict[str, object]
        if len(got) != REQUEST_FDS:
            reply = {"errno": errno.EINVAL, "message": f"{len(got)} fds, want {REQUEST_FDS}"}
        else:
            try:
                reply = {"pid": _fork(control, got, run)}
            except OSError as e:
                reply = {"errno": e.errno, "message": f"fork: {e.strerror}"}
        for fd in got:
            os.close(fd)
        control.send(json.dumps(reply).encode())


def _fork(control: socket.socket, fds: list[int], run: Callable[[int, int], None]) -> int:
    """The kernel's pid, once it holds only its own fds and is the machine's child: the
    kernel writes its pid into a pipe after closing every other fd (:func:`procs.detached`),
    so it is re-parented to the machine (a subreaper) when the pid is read."""
    return procs.detached(lambda ready: procs.exit_with(lambda: _become(fds, ready, run)),
                          "the kernel process")


def _become(fds: list[int], ready: int, run: Callable[[int, int], None]) -> None:
    """In the forked kernel: take the fds into place, close every other (the template's
    control socket too), say its pid on ``ready`` and close it, run the kernel (its exit
    status: :func:`procs.exit_with`, never back into the template's loop)."""
    ram, link, console = fds
    procs.settle({1: console, 2: console, RAM_FD: ram, LINK_FD: link}, ready)
    run(RAM_FD, LINK_FD)
