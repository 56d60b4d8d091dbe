"""Serve one userspace process's system calls over its connection.

A request is one SOCK_SEQPACKET record (:mod:`liveupdate.abi.wire`) with up to
:data:`MAX_FDS` file descriptors beside it (SCM_RIGHTS); the reply is one record with the
errno envelope and the fds the call returns. Each call runs under the big kernel lock through
:func:`liveupdate.abi.wire.dispatch`: unknown operations are ENOSYS, malformed arguments
EINVAL, a kernel bug an oops on the console and EFAULT. A process that sends garbage only
hurts itself.

Ownership of fds: the kernel closes its received copies after the call (a handler that needs
a file keeps its own reference, as ``fget`` does); fds in a reply are sent, then closed here --
the process owns its copy, the kernel keeps whatever it needs on its side.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import traceback
from typing import TYPE_CHECKING

from liveupdate.abi import syscalls, wire
from liveupdate.abi.wire import Message, arg
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.ipc import fds as fdpass
from liveupdate.kernel import debugfs, kexec, power, reboot
from liveupdate.kernel.syscalls import creds
from liveupdate.kernel.syscalls.files import FILE_SYSCALLS, Caller

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel
    from liveupdate.kernel.syscalls.process import Proc

MAX_REQUEST = 64 << 20
MAX_FDS = 253  # SCM_MAX_FD


def _uname(c: Caller, m: Message) -> Message:
    return Message({"release": c.k.image.release, "machine": "x86_64-lu"})


def _cmdline(c: Caller, m: Message) -> Message:
    return Message({"cmdline": c.k.cmdline.raw})


def _boot_id(c: Caller, m: Message) -> Message:
    """/proc/sys/kernel/random/boot_id: a fresh value at every boot, kexec included."""
    return Message({"boot_id": c.k.boot_id})


def _kexec_file_load(c: Caller, m: Message) -> Message:
    creds.require_sys_boot(c.peer.cred(), "kexec_file_load")  # unload too, as in Linux
    if arg(m, "unload", bool, False):
        kexec.unload(c.k)
        return Message({})
    loaded = kexec.file_load(c.k, m.payload, arg(m, "cmdline", str, ""))
    if c.k.link is not None:  # the machine starts the next kernel's process ahead of the jump
        c.k.link.call({"op": "kexec_loaded", "entry": loaded.image.entry,
                       "cmdline": loaded.cmdline})
    return Message({"entry": loaded.entry, "boot_params": loaded.boot_params})


def _reboot(c: Caller, m: Message) -> Message:
    creds.require_sys_boot(c.peer.cred(), "reboot")  # before the command is looked at
    k, cmd = c.k, arg(m, "cmd", int)
    if cmd == syscalls.LINUX_REBOOT_CMD_KEXEC:
        reboot.kernel_kexec(k)
    elif cmd == syscalls.LINUX_REBOOT_CMD_POWER_OFF:
        power.power_off(k)
    elif cmd == syscalls.LINUX_REBOOT_CMD_RESTART:
        power.restart(k)
    raise LiveUpdateError(err=errno.EINVAL, msg=f"unknown reboot command {cmd:#x}")


def _debugfs_read(c: Caller, m: Message) -> Message:
    """debugfs is mounted root-only (``DEBUGFS_DEFAULT_MODE`` 0700)."""
    creds.may_open_root_node(c.peer.cred(), "/sys/kernel/debug", write=False)
    return Message({}, debugfs.read(c.k, arg(m, "path", str)))


def _debugfs_write(c: Caller, m: Message) -> Message:
    creds.may_open_root_node(c.peer.cred(), "/sys/kernel/debug", write=True)
    debugfs.write(c.k, arg(m, "path", str), m.payload)
    return Message({})


SYSCALLS: dict[str, wire.Handler[Caller]] = {
    **FILE_SYSCALLS,
    "uname": _uname,
    "cmdline": _cmdline,
    "boot_id": _boot_id,
    "kexec_file_load": _kexec_file_load,
    "reboot": _reboot,
    "debugfs_read": _debugfs_read,
    "debugfs_write": _debugfs_write,
}


def _oops(k: Kernel, line: str) -> None:
    k.printk(line)
    traceback.print_exc(file=sys.stdout)


def call(k: Kernel, proc: Proc | None, msg: Message, peer: creds.Peer) -> Message:
    """One system call under the big kernel lock, after the pending hang-ups: a handle
    closed before this call is gone by the time it runs. ``peer`` is its sender, whose
    credentials a call that checks them reads now (:mod:`.creds`)."""
    with k.lock:
        k.files.drain()
        return wire.dispatch(SYSCALLS, Caller(k, proc, peer), msg, server="syscall",
                             on_bug=lambda line: _oops(k, line))


def _dropped_fds(arrived: int) -> AbiError:
    """Why recvmsg set MSG_CTRUNC: the fds beside a call did not all arrive. Linux sets it
    when the control buffer is full (then exactly MAX_FDS arrived: the call had more) and when
    the receiver ran out of fd slots while installing them (``scm_detach_fds`` stops early:
    fewer arrived) -- tell which, without needing an fd to find out."""
    if arrived < MAX_FDS:
        return AbiError(msg="the kernel has no free file descriptor for the fds passed with "
                        f"this call: {os.strerror(errno.EMFILE)}", err=errno.EMFILE)
    return AbiError(msg=f"more than {MAX_FDS} file descriptors in one call")


def _answer(k: Kernel, proc: Proc | None, raw: bytes, fds: list[int], flags: int,
            peer: creds.Peer) -> tuple[bytes, list[int]]:
    """The reply record and the fds to send with it."""
    try:
        if flags & socket.MSG_CTRUNC:
            raise _dropped_fds(len(fds))
        header, payload = wire.unpack(raw)
    except AbiError as e:
        return wire.pack({"errno": e.errno, "message": e.message}), []
    reply = call(k, proc, Message(header, payload, fds), peer)
    try:
        return wire.pack(reply.header, reply.payload), reply.fds
    except AbiError as e:  # a reply too large to send: nothing is returned
        for fd in reply.fds:
            os.close(fd)
        return wire.pack({"errno": e.errno, "message": e.message}), []


def serve(k: Kernel, conn: socket.socket, proc: Proc) -> None:
    try:
        _serve(k, conn, proc)
    finally:  # the process is gone: what it mapped is no longer pinned by it
        with k.lock:
            for mf in proc.mappings:
                mf.put()
            proc.mappings.clear()


def _serve(k: Kernel, conn: socket.socket, proc: Proc) -> None:
    while True:
        try:
            raw, fds, flags, peer = creds.recvmsg(conn, MAX_REQUEST, MAX_FDS)
        except OSError:
            return
        try:
            if not raw:
                return
            out, out_fds = _answer(k, proc, raw, fds, flags, peer)
            try:
                fdpass.sendmsg(conn, out, out_fds)
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    return
                try:  # too big for one record: the caller gets an errno, not a hang-up
                    conn.send(wire.pack({"errno": errno.EMSGSIZE, "message": "the reply "
                                         "does not fit one record; ask for less"}))
                except OSError:
                    return
            finally:
                for fd in out_fds:
                    os.close(fd)
        finally:
            peer.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
