"""The kernel process's host filesystem accesses, checked against what a kernel may touch.

A real kernel after a kexec reads nothing but RAM (ARCHITECTURE.md, invariant 1); the emulated
one is a host process that *could* open any file, close it again and so carry a value across
the jump with no fd left for the fd-based honesty test to see. So every filesystem access of
a kernel process goes through a ``sys.addaudithook`` hook (PEP 578) installed before its own
modules are imported, and is checked against a declared allowlist:

* from the start: Python's own imports (the interpreter's prefixes and ``sys.path``),
  ``/proc`` (reading its children, as the scheduler does) and ``/dev/null``;
* from the command line in RAM (:func:`liveupdate.kernel.confine.declare`): the service list
  on the disk, and the runtime folder the kernel creates for itself (read and write).

The console and the RAM are fds the machine gave; images come to ``kexec_file_load`` as bytes
from userspace, never as paths. A kernel process binds or connects no socket by address.
Anything else is a kernel panic naming the event and the path (the operation does not happen).

Limits: Python audits ``open``, directory listings and changes, not ``stat`` -- whether a file
exists is not checked; code in C extensions (numpy) is not audited, and the kernel calls none
that opens files. ``lu.confine=0`` turns the check off (to show what the other checks catch).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# events whose first argument is a path the process reads (or lists)
READS = {"os.listdir", "os.scandir", "glob.glob", "os.chdir", "pathlib.Path.glob",
         "pathlib.Path.rglob", "shutil.copyfile", "shutil.copytree", "os.listxattr",
         "os.getxattr", "ctypes.dlopen"}
# events whose arguments are paths the process creates, changes or removes
WRITES = {"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod",
          "os.chown", "os.link", "os.symlink", "os.utime", "os.chflags", "os.setxattr",
          "os.removexattr", "shutil.rmtree", "shutil.move", "shutil.chown",
          "shutil.make_archive", "shutil.unpack_archive", "tempfile.mkstemp",
          "tempfile.mkdtemp"}
NETWORK = {"socket.bind", "socket.connect", "socket.sendto"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _real(path: Any) -> str | None:
    """The absolute, symlink-free path an event names (None: not a path, e.g. an fd)."""
    if isinstance(path, int) or path is None:
        return None
    try:
        return os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return repr(path)


@dataclass
class Allowlist:
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    exact: tuple[str, ...] = ()  # read as themselves (a directory), not what is beneath
    on: bool = True
    violation: str = ""  # the first one, while there is no kernel to panic yet
    panic: Callable[[str], object] | None = None
    _busy: threading.local = field(default_factory=threading.local)

    def check(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            write = bool(flags & WRITE_FLAGS) or any(c in mode for c in "wax+")
            self._path(event, args[0], write)
        elif event in READS:
            self._path(event, args[0] if args else None, False)
        elif event in WRITES:
            for a in args[:2] if event in ("os.rename", "os.link", "os.symlink",
                                           "shutil.move") else args[:1]:
                self._path(event, a, True)
        elif event in NETWORK:
            self._deny(event, repr(args[1] if len(args) > 1 else args))

    def _path(self, event: str, path: Any, write: bool) -> None:
        real = _real(path)
        if real is None or _under(real, self.write) or (
                not write and (_under(real, self.read) or real in self.exact)):
            return
        self._deny(event, real)

    def _deny(self, event: str, what: str) -> None:
        why = f"kernel {event} {what}: outside what a kernel may touch (lu.confine)"
        if getattr(self._busy, "on", False):  # the panic itself touched something
            raise PermissionError(why)
        self._busy.on = True
        try:
            if self.panic is not None:
                self.panic(why)
            self.violation = self.violation or why
        finally:
            self._busy.on = False
        raise PermissionError(why)


ALLOW = Allowlist()


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if ALLOW.on and (event == "open" or event in READS or event in WRITES
                     or event in NETWORK):
        ALLOW.check(event, args)


def install() -> None:
    """First thing in the kernel process: from here on every audited access is checked.
    Bytecode is not written (a kernel writes nothing beside its own code)."""
    sys.dont_write_bytecode = True
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    roots |= set(sys.path)
    roots = {os.path.realpath(r) for r in roots if r} - {"/"}  # ``-m`` puts the cwd, "/", there
    ALLOW.read = tuple(sorted(roots | {"/proc"}))
    ALLOW.write = ("/dev/null",)
    sys.addaudithook(_hook)


def declare(read: list[str], write: list[str], exact: tuple[str, ...] | list[str] = ()) -> None:
    """What this kernel's command line says it may touch besides its code: ``read`` and
    ``write`` with everything beneath them, ``exact`` (read) only as itself."""
    ALLOW.read += tuple(os.path.realpath(p) for p in read)
    ALLOW.exact += tuple(os.path.realpath(p) for p in exact)
    ALLOW.write += tuple(os.path.realpath(p) for p in write)


def enforce(panic: Callable[[str], object]) -> None:
    """The kernel exists: a violation is a panic from now on -- and one seen before is one
    now."""
    ALLOW.panic = panic
    if ALLOW.violation:
        panic(ALLOW.violation)


def disable() -> None:
    ALLOW.on = False
