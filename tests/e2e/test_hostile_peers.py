"""Garbage on the syscall transport gets an errno, never a crash (the control socket:
tests/machine)."""

from __future__ import annotations

import os
import sys

from tests.e2e.conftest import Factory

GARBAGE_SYSCALLS = r"""
import os, socket, struct
from liveupdate.abi import wire
s = socket.socket(fileno=int(os.environ["LU_SYSCALL_FD"]))
def ask(msg):
    s.send(msg)
    return wire.unpack(s.recv(1 << 20))[0]
out = []
out.append(ask(b"\xff\xff\xff\xff garbage")["errno"])
out.append(ask(struct.pack("<I", 4) + b"[1,2]")["errno"])
out.append(ask(wire.pack({"op": "no_such_call"}))["errno"])
out.append(ask(wire.pack({"op": "kexec_file_load", "cmdline": 7}, b"x"))["errno"])
bad_image = b"LUKIMG01" + b"\xff" * 40
out.append(ask(wire.pack({"op": "kexec_file_load", "cmdline": ""}, bad_image))["errno"])
out.append(ask(wire.pack({"op": "reboot", "cmd": 12345}))["errno"])
out.append(ask(wire.pack({"op": "debugfs_read", "path": "../../etc/passwd"}))["errno"])
out.append(ask(wire.pack({"op": "uname"}))["errno"])
print(out)
"""


def test_syscall_garbage_gets_errnos(machine: Factory) -> None:
    m = machine()
    r = m.run([sys.executable, "-c", GARBAGE_SYSCALLS])
    assert r["status"] == 0, r["stderr"]
    # EINVAL, EINVAL, ENOSYS, EINVAL, ENOEXEC, EINVAL, ENOENT, then a healthy call
    assert r["stdout"].strip() == "[22, 22, 38, 22, 8, 22, 2, 0]"
    assert m.status()["state"] == "running"


FDS_TO_KERNEL = r"""
import array, os, socket
from liveupdate.client.syscall import Kernel
k = Kernel()
pipes = [os.pipe() for _ in range(4)]
mine = [r for r, _ in pipes]
for _ in range(50):  # fds that a call does not take are closed by the kernel, every time
    m = k.call_fds("uname", fds=mine)
    assert m.fds == [] and m.header["release"]
print(k.call_fds("uname", fds=mine).header["errno"])
"""


def test_syscalls_close_fds_they_do_not_take(machine: Factory) -> None:
    m = machine()
    kpid = m.status()["kernel_pid"]
    r = m.run([sys.executable, "-c", FDS_TO_KERNEL])
    assert r["status"] == 0 and r["stdout"].strip() == "0", r["stderr"]
    pipes = [fd for fd in os.listdir(f"/proc/{kpid}/fd")
             if int(fd) > 2 and os.readlink(f"/proc/{kpid}/fd/{fd}").startswith("pipe:")]
    assert pipes == []  # 204 pipe ends were sent in; none stayed


BIG_IO = r"""
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError
k = Kernel()
fd = k.memfd_create("io")
data = bytes(range(256)) * 8192  # 2 MiB: many records each way
assert k.pwrite(fd, data, 4096) == len(data)
assert k.pread(fd, len(data) + 100, 4096) == data  # short only at the end of the file
try:
    k.call("pread", fds=[fd], count=64 << 20, offset=0)  # one oversized call
except LiveUpdateError as e:
    print(e.errno_name)
"""


def test_bulk_io_moves_in_pieces_and_oversized_calls_get_errnos(machine: Factory) -> None:
    m = machine()
    r = m.run([sys.executable, "-c", BIG_IO])
    assert r["status"] == 0, r["stderr"]
    assert r["stdout"].split() == ["EINVAL"]
