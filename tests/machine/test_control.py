"""The machine's control socket and power, against a real machine process: garbage gets an
errno, the RAM debug port answers host-side tools only, a panic is a state that a power cycle
leaves (moved from tests/e2e: machine-level cases)."""

from __future__ import annotations

import errno
import socket
import struct
import sys

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.machine import protocol
from tests.e2e.conftest import Factory


def test_control_socket_garbage(machine: Factory) -> None:
    m = machine()
    path = m.path
    with socket.socket(socket.AF_UNIX) as s:  # a frame announcing 4 GiB: dropped
        s.connect(path)
        s.sendall(struct.pack("<I", 0xFFFFFFFF) + b"xx")
        try:
            data = s.recv(16)
        except ConnectionResetError:  # closed with our bytes unread
            data = b""
        assert data == b""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        protocol.send(s, {"op": "ram_read", "phys": 1 << 62, "size": 8})
        reply = protocol.recv(s)
        assert reply is not None and reply[0]["errno"] == errno.EFAULT
        protocol.send(s, {"op": "wait", "pattern": "(", "timeout": 1})
        reply = protocol.recv(s)
        assert reply is not None and reply[0]["errno"] == errno.EINVAL  # bad regex
        protocol.send(s, {"op": "ram_read"})
        reply = protocol.recv(s)
        assert reply is not None and reply[0]["errno"] == errno.EINVAL
    assert m.status()["state"] == "running"


def test_ram_debug_port_refuses_the_machines_own_processes(machine: Factory) -> None:
    """Confined, a guest does not even see the control socket (kernel/mountns.py); this is
    the guard behind that, for a host where the cover cannot be made."""
    m = machine("kho=on lu.confine=0")
    probe = ("import os, sys\n"
             "from liveupdate.client.syscall import Kernel\n"
             "from liveupdate.errors import LiveUpdateError\n"
             "from liveupdate.machine.client import MachineClient\n"
             "run = [w[7:] for w in Kernel().cmdline().split() if w.startswith('lu.run=')][0]\n"
             "c = MachineClient(os.path.dirname(run))\n"
             "print(c.status()['state'])\n"
             "for op in (lambda: c.ram_read(0x1000, 8), lambda: c.ram_write(0x1000, b'x'),\n"
             "           lambda: c.console(0), lambda: c.wait('x', timeout=1.0),\n"
             "           lambda: c.dma_log(), lambda: c.device_wait('00:03.0', 1, 1.0)):\n"
             "    try:\n        op()\n    except LiveUpdateError as e:\n"
             "        print(e.errno_name)\n")
    r = m.run([sys.executable, "-c", probe])
    assert r["status"] == 0, r["stderr"]
    assert r["stdout"].split() == ["running"] + ["EPERM"] * 6
    assert m.ram_read(0x1000, 8) is not None  # host-side tools still have it


def test_panic_and_power_cycle(machine: Factory) -> None:
    m = machine("kho=on test_panic=oops", wait=False)
    st = m.wait_state("panic", "running", timeout=60)
    assert st["state"] == "panic" and "test_panic: oops" in st["reason"]
    m.wait("Kernel panic - not syncing: test_panic: oops")
    with pytest.raises(LiveUpdateError) as e:
        m.run([sys.executable, "-c", "pass"])
    assert e.value.errno == errno.EAGAIN  # nothing running
    m.power_cycle(cmdline="kho=on")
    assert m.booted()["state"] == "running"
