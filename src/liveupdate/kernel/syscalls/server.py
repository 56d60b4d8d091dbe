"""Serve one userspace process's syscalls over its connection.

Each request is handled under the big kernel lock; a handler returns a reply header and
payload or raises LiveUpdateError, which becomes an errno reply. Malformed requests get EINVAL,
unknown operations ENOSYS; the connection is never the kernel's problem: a process that sends
garbage only hurts itself.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from liveupdate.abi import syscalls, wire
from liveupdate.errors import LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel
    from liveupdate.kernel.syscalls.process import Proc

Reply = tuple[dict[str, Any], bytes]
Handler = Callable[["Kernel", dict[str, Any], bytes], Reply]
MAX_REQUEST = 64 << 20


def _uname(k: Kernel, h: dict[str, Any], p: bytes) -> Reply:
    return {"release": k.image.release, "machine": "x86_64-lu"}, b""


def _cmdline(k: Kernel, h: dict[str, Any], p: bytes) -> Reply:
    return {"cmdline": k.cmdline.raw}, b""


def _kexec_file_load(k: Kernel, h: dict[str, Any], p: bytes) -> Reply:
    from liveupdate.kernel import kexec

    cmdline = h.get("cmdline", "")
    if not isinstance(cmdline, str):
        raise LiveUpdateError(errno.EINVAL, "cmdline must be a string")
    if h.get("unload"):
        kexec.unload(k)
        return {}, b""
    seg = kexec.file_load(k, p, cmdline)
    return {"entry": seg.entry, "boot_params": seg.boot_params}, b""


def _reboot(k: Kernel, h: dict[str, Any], p: bytes) -> Reply:
    from liveupdate.kernel import kexec, power

    cmd = h.get("cmd")
    if cmd == syscalls.LINUX_REBOOT_CMD_KEXEC:
        kexec.kernel_kexec(k)
    elif cmd == syscalls.LINUX_REBOOT_CMD_POWER_OFF:
        power.power_off(k)
    elif cmd == syscalls.LINUX_REBOOT_CMD_RESTART:
        power.restart(k)
    raise LiveUpdateError(errno.EINVAL, f"unknown reboot command {cmd!r}")


def _debugfs_read(k: Kernel, h: dict[str, Any], p: bytes) -> Reply:
    from liveupdate.kernel import debugfs

    return {}, debugfs.read(k, str(h.get("path", "")))


def _debugfs_write(k: Kernel, h: dict[str, Any], p: bytes) -> Reply:
    from liveupdate.kernel import debugfs

    debugfs.write(k, str(h.get("path", "")), p)
    return {}, b""


SYSCALLS: dict[str, Handler] = {
    "uname": _uname,
    "cmdline": _cmdline,
    "kexec_file_load": _kexec_file_load,
    "reboot": _reboot,
    "debugfs_read": _debugfs_read,
    "debugfs_write": _debugfs_write,
}


def dispatch(k: Kernel, msg: bytes) -> bytes:
    try:
        header, payload = wire.unpack(msg)
        handler = SYSCALLS.get(str(header.get("op")))
        if handler is None:
            raise LiveUpdateError(errno.ENOSYS, f"no syscall {header.get('op')!r}")
        with k.lock:
            reply, data = handler(k, header, payload)
        reply["errno"] = 0
        return wire.pack(reply, data)
    except LiveUpdateError as e:
        return wire.pack({"errno": e.errno, "message": e.message})
    except Exception as e:  # a kernel bug: oops, fail the call, keep the kernel up
        k.printk(f"BUG: {type(e).__name__} in syscall: {e}")
        traceback.print_exc(file=sys.stdout)
        return wire.pack({"errno": errno.EFAULT, "message": f"kernel oops: {e}"})


def serve(k: Kernel, conn: socket.socket, proc: Proc) -> None:
    while True:
        try:
            msg, anc, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * 16))
        except OSError:
            return
        for level, kind, data in anc:  # no syscall takes fds yet: close what was sent
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not msg:
            return
        try:
            conn.send(dispatch(k, msg))
        except OSError:
            return
