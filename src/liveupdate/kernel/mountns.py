"""The machine's own files out of sight: a private mount namespace for a kernel and its userspace.

On a real machine the next kernel's userspace cannot read what the previous kernel printed on
the serial port: the console is the host's. The emulated machine keeps its console log, its
control socket and its log beside ``disk/`` and ``run/`` in its folder, where any host process
could read them -- so a process could print a value and the next kernel's userspace read it
back, a channel across the kexec that is not the handover. Each kernel process therefore
enters a mount namespace of its own (``unshare(CLONE_NEWNS)``, every mount made a slave:
the host's later mounts still arrive, ours never leave) and covers every entry of the
machine's folder but ``disk/`` and ``run/``: a file or socket with ``/dev/null`` bound over
it, a folder with an empty read-only tmpfs (a symlink is named, not covered). Its
userspace inherits the namespace and, inside the Landlock domain that :mod:`.confine` makes
next, cannot unmount the covers (a sandboxed process cannot change the mount topology).
What the machine creates later in its folder is not covered; it creates its files before the
first boot.

Needs CAP_SYS_ADMIN: without it (an unprivileged host) nothing is hidden, and the kernel says
so on the console.
"""

from __future__ import annotations

import ctypes
import errno
import os

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 1 << 19


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(r: int, what: str) -> None:
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None,
           flags: int, data: str | None = None) -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]),
           f"mount {target}")


def hide(folder: str, keep: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Enter a private mount namespace and cover every entry of ``folder`` whose name is not
    in ``keep``; returns the paths covered and, for each entry that could not be, why (one
    failure does not stop the others: a symlink, which mount would follow, is not covered
    but named; an entry gone meanwhile is nothing to cover). OSError when the namespace
    itself cannot be made (EPERM without CAP_SYS_ADMIN)."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # slave, not private: the host's later mounts still reach us, ours never reach it
    _mount(libc, None, "/", None, MS_REC | MS_SLAVE)
    covered: list[str] = []
    failed: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name in keep:
            continue
        try:
            if e.is_symlink():
                failed.append(f"{e.path}: a symlink (mount would follow it)")
                continue
            if e.is_dir(follow_symlinks=False):
                _mount(libc, "tmpfs", e.path, "tmpfs",
                       MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
            else:
                _mount(libc, "/dev/null", e.path, None, MS_BIND)
        except FileNotFoundError:
            continue
        except OSError as err:
            if err.errno == errno.ENOENT:
                continue
            failed.append(f"{e.path}: {err.strerror or err}")
            continue
        covered.append(e.path)
    return covered, failed
