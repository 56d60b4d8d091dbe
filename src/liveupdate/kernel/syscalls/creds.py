"""The caller's credentials at each system call (Linux's ``current_cred()``) and the checks
made against them.

Linux checks a system call against the credentials its task holds *when it makes the call*:
a process that ``setuid(65534)``-s after starting is uid 65534 from then on, and has lost its
capabilities (``cap_emulate_setxuid``). The emulated kernel serves a host process over a
socket, so it must learn those credentials from the host kernel, per call, in a way the
caller cannot forge. ``SO_PEERCRED`` will not do: it is fixed at connect time (for the
socketpair of a syscall connection, the emulated kernel's own). Instead:

* the kernel's end of every syscall connection has ``SO_PASSCRED`` and, where the host has it
  (Linux 6.5+), ``SO_PASSPIDFD`` set before the process starts, so the host kernel attaches
  to each request the sender's pid (``SCM_CREDENTIALS``: a sender without ``CAP_SYS_ADMIN``
  cannot name another pid, ``scm_check_creds``) and a pidfd for it (``SCM_PIDFD``). The
  client reports nothing about itself.
* a call that checks permissions reads ``/proc/<pid>/status`` (``Uid:`` real, effective,
  saved, fs; ``CapEff:``) at that call, then confirms through the pidfd that the sender was
  not reaped meanwhile -- so its pid was not reused and what was read is the sender's. On a
  host without ``SO_PASSPIDFD`` that last step is skipped (a sender that exits right after
  sending leaves a pid-reuse window). Calls that check nothing (``uname``, memfd I/O on a
  handle the caller holds) read nothing: as in Linux, an fd is the right to use its file.

The checks are Linux's: ``generic_permission`` for a root-owned node (fsuid 0 is the owner;
otherwise ``CAP_DAC_OVERRIDE``, or ``CAP_DAC_READ_SEARCH`` for reading) and ``capable()``
against the effective set.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import signal
import socket
from dataclasses import dataclass, field

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import fds as fdpass

SO_PASSPIDFD = 76  # include/uapi/asm-generic/socket.h; not in Python 3.11's socket module
SCM_PIDFD = 0x04  # include/linux/socket.h

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SYS_BOOT = 22
_UCRED = 12  # struct ucred: pid, uid, gid
_ANC_EXTRA = socket.CMSG_SPACE(_UCRED) + socket.CMSG_SPACE(4)


@dataclass(frozen=True)
class Cred:
    """What Linux checks (``struct cred``): the fs uid for file permissions, the effective
    capability set for ``capable()``."""

    pid: int
    uid: int
    euid: int
    fsuid: int
    cap_eff: int

    def capable(self, cap: int) -> bool:
        return bool(self.cap_eff >> cap & 1)


def parse_status(pid: int, text: str) -> Cred:
    """``Uid:`` and ``CapEff:`` of a ``/proc/<pid>/status``."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        uids = [int(v) for v in fields["Uid"].split()]
        return Cred(pid, uids[0], uids[1], uids[3], int(fields["CapEff"].strip(), 16))
    except (KeyError, IndexError, ValueError) as e:
        raise LiveUpdateError(err=errno.EPERM, msg=f"credentials of pid {pid} unreadable") \
            from e


@dataclass(eq=False)
class Peer:
    """The sender of one request, as the host kernel named it. :meth:`cred` reads its
    credentials at most once per call, and only for a call that checks them."""

    pid: int | None = None
    pidfd: int | None = None
    _cred: Cred | None = field(default=None, repr=False)

    def cred(self) -> Cred:
        if self._cred is None:
            self._cred = self._read()
        return self._cred

    def _read(self) -> Cred:
        if self.pid is None or self.pid <= 0:
            raise LiveUpdateError(err=errno.EPERM, msg="the caller's credentials are unknown")
        try:
            with open(f"/proc/{self.pid}/status") as f:
                text = f.read()
        except FileNotFoundError as e:
            raise LiveUpdateError(err=errno.ESRCH, msg="the caller is gone") from e
        except OSError as e:  # EMFILE: this kernel process is out of fds itself
            raise LiveUpdateError(err=e.errno or errno.EIO, msg="reading the caller's "
                                  f"credentials: {e.strerror}") from e
        if self.pidfd is not None:
            try:  # still not reaped: the pid was not reused while we read it
                signal.pidfd_send_signal(self.pidfd, 0)
            except ProcessLookupError as e:
                raise LiveUpdateError(err=errno.ESRCH, msg="the caller is gone") from e
            except PermissionError:
                pass  # it exists; signalling it is not ours to do
        return parse_status(self.pid, text)

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


def enable(sock: socket.socket) -> None:
    """Ask the host kernel to name the sender of every record that arrives on ``sock``.
    Set before the peer runs: a record is labelled when it is sent."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with contextlib.suppress(OSError):  # Linux < 6.5: the pid alone
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)


def recvmsg(sock: socket.socket, size: int,
            max_fds: int) -> tuple[bytes, list[int], int, Peer]:
    """:func:`liveupdate.ipc.fds.recvmsg` plus the sender (:class:`Peer`; the caller closes
    it). The control buffer has room for the credentials beside ``max_fds`` fds, so
    MSG_CTRUNC still means what it means there."""
    raw, anc, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(4 * max_fds) + _ANC_EXTRA)
    peer = Peer()
    for level, kind, data in anc:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED:
            peer.pid = int.from_bytes(data[:4], "little", signed=True)
        elif kind == SCM_PIDFD and len(data) >= 4:
            peer.pidfd = array.array("i", data[:4])[0]
    return raw, fdpass.received(anc), flags, peer


def may_open_root_node(c: Cred, path: str, *, write: bool) -> None:
    """``generic_permission`` on a node owned by root with mode 0600 (a directory: 0700):
    the owner (fsuid 0) may; anyone else only with ``CAP_DAC_OVERRIDE`` (reading:
    ``CAP_DAC_READ_SEARCH`` is enough). EACCES otherwise, as ``may_open`` returns."""
    if c.fsuid == 0 or c.capable(CAP_DAC_OVERRIDE):
        return
    if not write and c.capable(CAP_DAC_READ_SEARCH):
        return
    raise LiveUpdateError(err=errno.EACCES, msg=f"{path}: permission denied (uid {c.fsuid}; "
                          "root only)")


def require_sys_boot(c: Cred, call: str) -> None:
    """``capable(CAP_SYS_BOOT)``, the first check of ``kexec_file_load``
    (``kexec_load_permitted``) and of ``reboot``: EPERM before anything is parsed."""
    if not c.capable(CAP_SYS_BOOT):
        raise LiveUpdateError(err=errno.EPERM, msg=f"{call}: operation not permitted "
                              f"(uid {c.euid} lacks CAP_SYS_BOOT)")
