"""The kernel process, forked by its template (``python -m liveupdate.kernel.main
--template-fd N``, :mod:`liveupdate.kernel.template`) with its code imported.

The machine may ask for it early: it waits on the link for "go" with the physical address of
the boot parameters -- after "prepare", when the machine sends one, with the command line it
expects the jump to carry and how many userspace spares to start: the process confines itself
by that line (checked against RAM at boot) and starts its spares (:mod:`.spares`) before "go".
From "go" on it holds exactly the fds the machine gave (RAM, link, stdio to the console) and
the sockets to its own userspace, and reads everything else from RAM. After boot it serves
the machine's requests (run a program, KHO debugfs and status) while userspace runs.
"""

from __future__ import annotations

if __name__ == "__main__":  # the kernel process: audited before its own code loads
    from liveupdate.kernel import fsaudit

    fsaudit.install()

import argparse
import contextlib
import errno
import os
import resource
import socket
import subprocess
import sys
import threading
import traceback
from typing import Any

# np.unique imports numpy.ma on first use: 40 ms of the first retrieve after a kexec
import numpy.ma  # noqa: F401

from liveupdate.abi import wire
from liveupdate.abi.cmdline import Cmdline
from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.abi.wire import Handler, Message, arg
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import boot, confine, debugfs, fsaudit, init, template
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.link import Link
from liveupdate.kernel.mm.pages import PageMeta
from liveupdate.kernel.spares import READY_TIMEOUT, Spares, warm
from liveupdate.kernel.syscalls import server
from liveupdate.kernel.syscalls.process import Userspace
from liveupdate.procs import become_subreaper, freeze_heap


def _run(k: Kernel, m: Message) -> Message:
    argv = arg(m, "argv", list)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise LiveUpdateError(err=errno.EINVAL, msg="run: argv must be a non-empty list of strings")
    timeout = arg(m, "timeout", float, 60.0)
    try:
        proc = k.require_userspace().spawn(argv, capture=True, cwd=k.disk_dir or "/")
    except OSError as e:  # execve's errno (ENOENT, EACCES, ENOEXEC, ...), as a shell says it
        raise LiveUpdateError(err=e.errno or errno.ENOEXEC,
                              msg=f"run: {argv[0]}: {e.strerror or e}") from e
    assert isinstance(proc.popen, subprocess.Popen)  # captured: never a spare
    try:
        out, err = proc.popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.popen.kill()
        proc.popen.communicate()
        raise LiveUpdateError(
            err=errno.ETIMEDOUT, msg=f"run: {argv[0]} did not exit in {timeout}s") \
            from e
    finally:
        k.require_userspace().reap(proc)
    return Message({"status": proc.popen.returncode, "stdout": out.decode(errors="replace"),
                    "stderr": err.decode(errors="replace")})


def _locked(fn: Handler[Kernel]) -> Handler[Kernel]:
    """Under the big kernel lock, after pending hang-ups (as every syscall is), so what a
    request reports already reflects every handle closed before it."""
    def run(k: Kernel, m: Message) -> Message:
        with k.lock:
            k.files.drain()
            return fn(k, m)
    return run


REQUESTS: dict[str, Handler[Kernel]] = {
    "run": _run,  # not under the lock: the program makes syscalls while it runs
    "kho_status": _locked(lambda k, m: Message({"status": debugfs.status(k)})),
    "debugfs": _locked(lambda k, m: Message({}, debugfs.read(k, arg(m, "path", str)))),
    "ping": _locked(lambda k, m: Message({"boot_id": k.boot_id})),
    "maps": _locked(lambda k, m: Message({"procs": k.require_userspace().maps()})),
}


def _oops(k: Kernel, line: str) -> None:
    k.printk(line)
    traceback.print_exc(file=sys.stdout)


def _serve_request(k: Kernel, link: Link, h: dict[str, Any]) -> None:
    reply = wire.dispatch(REQUESTS, k, Message(h), server="kernel",
                          on_bug=lambda line: _oops(k, line))
    reply.header["id"] = h.get("id")
    if k.require_userspace().dying:
        return  # going down: the machine fails what is pending when this kernel is gone
    try:
        link.send(reply.header, reply.payload)
    except OSError as e:
        if e.errno != errno.EMSGSIZE:
            return  # the machine is gone; nobody to answer
        with contextlib.suppress(OSError):
            link.send({"id": h.get("id"), "errno": errno.EMSGSIZE,
                       "message": f"the reply to {h.get('op')} does not fit one link record"})


def main() -> None:
    ap = argparse.ArgumentParser(prog="liveupdate-kernel")
    ap.add_argument("--template-fd", type=int, required=True,
                    help="the machine's end of the control socket: fork a kernel per request")
    args = ap.parse_args()
    warm()  # each kernel forks its spare template instead of starting a Python
    freeze_heap()
    template.serve(socket.socket(fileno=args.template_fd), run)


def _prepare(link: Link, h: dict[str, Any], ram_fd: int
             ) -> tuple[confine.Early, Spares | None, PageMeta]:
    """Before "go": confine this process by the command line the machine expects the jump
    to carry, become a subreaper, start the userspace spares (none with ``lu.spares=0``),
    fault in the page metadata's memory (after the spares' fork: they need none of it) and
    say "ready" once all that is done (kernel/spares.py)."""
    raw = str(h.get("cmdline", ""))
    early = confine.early(raw)
    become_subreaper()
    count = int(h.get("spares", 0)) if Cmdline.parse(raw).flag("lu.spares", True) else 0
    spares = Spares(count, early.lines.append) if count > 0 else None
    if spares is not None and not spares.ready.wait(READY_TIMEOUT):
        early.lines.append(f"spares: not ready in {READY_TIMEOUT:g} s")
    meta = PageMeta.populated(os.fstat(ram_fd).st_size >> PAGE_SHIFT)
    link.send({"op": "ready", "spares": spares.count() if spares else 0})
    return early, spares, meta


def run(ram_fd: int, link_fd: int) -> None:
    """One kernel, from "go" (after "prepare", when the machine sends it) to power off."""
    link = Link(socket.socket(fileno=link_fd))
    msg = link.recv()
    early, spares, meta = None, None, None
    if msg is not None and msg[0].get("op") == "prepare":
        early, spares, meta = _prepare(link, msg[0], ram_fd)
        msg = link.recv()
    if msg is None or msg[0].get("op") != "go":
        sys.exit(0)  # the machine let this warm kernel go unused
    k = Kernel(ram_fd, link, meta)
    k.early = early
    fsaudit.enforce(k.panic)  # a violation is a panic from now on
    become_subreaper()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a handle per open file
    k.userspace = Userspace(lambda conn, proc: server.serve(k, conn, proc), spares)
    try:
        with k.lock:
            boot.start_kernel(k, int(msg[0]["boot_params"]))
            link.start_routing()  # userspace may reach hardware: answers come through the loop
            k.printk("Run /init as init process")
            init.start_services(k)
    except Exception as e:  # a bug in the kernel is a kernel panic, as BUG() is
        traceback.print_exc(file=sys.stdout)
        k.panic(f"unexpected {type(e).__name__} during boot: {e}")
    link.send({"op": "booted", "release": k.image.release, "boot_id": k.boot_id,
               "run_dir": k.run_dir, "kho_boot": k.kho_in is not None})
    k.files.release_promptly(k.lock)
    with k.lock:
        if k.luo is None or k.luo.settled:
            k.say_settled()
    link.start_routing()  # (again, if boot panicked before it)
    while True:
        try:
            req = link.recv()
        except OSError:
            req = None
        if req is None:  # the machine went away: power is gone
            k.require_userspace().kill_all()
            return
        if not link.route(req[0]):
            threading.Thread(target=_serve_request, args=(k, link, req[0]),
                             daemon=True).start()


if __name__ == "__main__":
    main()
